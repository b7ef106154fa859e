/*
fastllm's CUDA emulator runtime (see include/cuda_runtime.h for the model): device memory, errors, launch
checks, and the block scheduler. The blocks of a launch are shared out to worker threads (FASTLLM_CUDA_EMU_THREADS,
default: the CPU's cores), each running one block at a time. A block's threads are fibers on its worker; a pass
resumes each live fiber once (warp by warp), and a fiber runs until it waits at a barrier or a warp collective
or exits. A pass in which no fiber arrives anywhere or exits is a deadlock. O(threads) fiber switches per barrier.
*/
#include <sys/mman.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <atomic>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

// ---- fiber switch (x86-64 System V): saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save, and continues on `to`'s stack.
extern "C" void fastllm_emu_switch(void** save, void* to);
asm(R"(
    .text
    .p2align 4
    .globl fastllm_emu_switch
    .hidden fastllm_emu_switch
    .type fastllm_emu_switch, @function
fastllm_emu_switch:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size fastllm_emu_switch, .-fastllm_emu_switch
)");

namespace emu {

dim3 g_grid_dim, g_block_dim;

namespace {

// ---- settings (environment, read once)
struct Settings {
    int arch = 90;             // FASTLLM_CUDA_EMU_ARCH: 90 (H100 limits) or 80 (A100)
    // FASTLLM_CUDA_EMU_CP_ASYNC, when a cp.async lands: deferred (at the wait_group that must see it: catches
    // reads before the wait), eager (at once: catches a prefetch that overwrites data still in use), mixed
    // (default: each copy one or the other, by a hash of block, thread and copy number: both, reproducibly)
    int copies = 2;
    // FASTLLM_CUDA_EMU_ORDER, how the threads of a block take turns between waits:
    //   forward/reverse/shuffle: each live thread once per pass (warps stay within one collective of each other);
    //   warps (default)/warps-reverse: a warp runs until all its lanes wait at __syncthreads or exit, then the next
    //   (warps drift apart as far as the barriers allow: races between warps show as wrong results)
    int order = 3;
    bool trace = false;         // FASTLLM_CUDA_EMU_TRACE=1: print each launch to stderr
    int threads = 1;            // FASTLLM_CUDA_EMU_THREADS: workers running blocks side by side
    Settings() {
        threads = std::max(1, (int)std::thread::hardware_concurrency());
        if (const char* t = getenv("FASTLLM_CUDA_EMU_THREADS")) threads = std::max(1, atoi(t));
        trace = getenv("FASTLLM_CUDA_EMU_TRACE") != nullptr;
        if (const char* a = getenv("FASTLLM_CUDA_EMU_ARCH")) arch = atoi(a) == 80 ? 80 : 90;
        if (const char* c = getenv("FASTLLM_CUDA_EMU_CP_ASYNC"))
            copies = std::string(c) == "deferred" ? 0 : std::string(c) == "eager" ? 1 : 2;
        if (const char* o = getenv("FASTLLM_CUDA_EMU_ORDER")) {
            const std::string v = o;
            order = v == "forward" ? 0 : v == "reverse" ? 1 : v == "shuffle" ? 2 : v == "warps-reverse" ? 4 : 3;
        }
    }
    size_t smem_optin() const { return arch == 90 ? 232448 : 166912; }
    int sms() const { return arch == 90 ? 132 : 108; }
};
const Settings& settings() {
    static Settings s;
    return s;
}

// ---- errors: the last error and its message (kept after cudaGetLastError clears the code); within a launch
// the first fault wins and stops the other workers
std::mutex g_error_mu;
cudaError_t g_error = cudaSuccess;
std::string g_message;
std::atomic<bool> g_abort{false};

cudaError_t set_error(cudaError_t e, std::string msg) {
    std::lock_guard<std::mutex> lock(g_error_mu);
    g_error = e;
    g_message = std::move(msg);
    return e;
}
void fault_once(const std::string& msg) {  // from a worker, during a launch
    if (!g_abort.exchange(true)) set_error(cudaErrorLaunchFailure, msg);
}

// ---- device memory: host allocations, registered so copies and kernel arguments can be checked
std::map<uintptr_t, size_t>& allocations() {
    static std::map<uintptr_t, size_t> m;
    return m;
}
bool in_device(const void* p, size_t bytes) {
    auto& m = allocations();
    auto it = m.upper_bound((uintptr_t)p);
    if (it == m.begin()) return false;
    --it;
    return (uintptr_t)p + bytes <= it->first + it->second;
}

// ---- shared memory: one buffer per worker; dynamic shared memory is placed at its end so overruns leave it
constexpr size_t kSmemCap = 233472;
alignas(1024) thread_local unsigned char g_smem[kSmemCap];
size_t g_dyn_off = kSmemCap;

// ---- fibers: stacks of kStack bytes (cuda_runtime.h), kStack-aligned, each under a guard page
constexpr size_t kGuard = 4096;
struct Worker;

struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    int bytes, src_bytes;
    long group;  // -1: not committed yet
};

struct Fiber {
    Thread t;
    Worker* worker = nullptr;
    void* sp = nullptr;
    unsigned char* stack = nullptr;
    int linear = 0, warp = 0, lane = 0;
    bool done = false;
    const char* waiting = nullptr;
    std::vector<Copy> copies;
    long committed = 0;
    uint64_t issued = 0;  // cp.async instructions so far
#ifdef EMU_ASAN
    void* fake = nullptr;
#endif
};

struct Warp {
    unsigned exist = 0, live = 0;  // lane masks
    unsigned mask = 0;              // the collective being gathered
    const char* op = nullptr;
    int arrived = 0, expected = 0;
    unsigned gen = 0;
    uint32_t buf[2][32 * 8];
};

struct Block {
    int n = 0, live = 0, bar_arrived = 0;
    unsigned bar_gen = 0;
    std::vector<Warp> warps;
};

// a worker thread: its fibers, the one running, the scheduler's stack, the block, its shared memory. The fibers
// reach it through their own record (me()), the scheduler once per block: thread_local reads are slow in a module.
struct Worker {
    std::vector<Fiber> fibers;
    Fiber* cur = nullptr;
    void* sched_sp = nullptr;
    Block block;
    unsigned long progress = 0;
    bool faulted = false;
    unsigned char* smem = g_smem;  // this worker's (a thread_local, read here once)
#ifdef EMU_ASAN
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
#endif
};
thread_local Worker g_worker;
Body g_body;  // the launch's kernel and arguments, shared by the workers

// thread stacks, kept for reuse across launches and workers
std::mutex g_stacks_mu;
std::vector<unsigned char*> g_stacks;

struct Fault : std::runtime_error {
    using std::runtime_error::runtime_error;
};

std::string where(const Fiber* f) {
    char buf[160];
    const uint3 b = f->t.block_idx, t = f->t.idx;
    snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", b.x, b.y, b.z, t.x, t.y, t.z);
    return buf;
}

Fiber& me() { return *(Fiber*)stack_top()[1]; }  // the running thread, inside a kernel

void to_scheduler(Fiber& f) {
    Worker& w = *f.worker;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(f.done ? nullptr : &f.fake, w.sched_bottom, w.sched_size);
#endif
    fastllm_emu_switch(&f.sp, w.sched_sp);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake, &w.sched_bottom, &w.sched_size);
#endif
}

void run_copies(Fiber& f, long upto) {  // completes the committed groups <= upto, in issue order
    auto it = std::stable_partition(f.copies.begin(), f.copies.end(),
                                    [&](const Copy& c) { return !(c.group >= 0 && c.group <= upto); });
    for (auto c = it; c != f.copies.end(); ++c) {
        std::memcpy(c->dst, c->src, c->src_bytes);
        std::memset(c->dst + c->src_bytes, 0, c->bytes - c->src_bytes);
    }
    f.copies.erase(it, f.copies.end());
}

void release_barriers(Block& b) {  // after an exit: a barrier whose remaining threads have all arrived opens
    if (b.bar_arrived > 0 && b.bar_arrived == b.live) {
        b.bar_arrived = 0;
        b.bar_gen++;
    }
}

void fiber_exit(Fiber& f) {
    for (auto& c : f.copies)
        if (c.group < 0) c.group = f.committed + 1;
    run_copies(f, 1L << 62);
    f.done = true;
    f.worker->progress++;
    Block& b = f.worker->block;
    b.live--;
    Warp& w = b.warps[f.warp];
    w.live &= ~(1u << f.lane);
    if (w.arrived > 0 && (w.mask >> f.lane & 1u))
        throw Fault(std::string("lane ") + std::to_string(f.lane) + " exited while lanes of its warp wait for it in " +
                    w.op);
    release_barriers(b);
}

void fiber_entry() {
    Fiber& f = me();
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &f.worker->sched_bottom, &f.worker->sched_size);
#endif
    try {
        g_body.fn(g_body.ctx);
        fiber_exit(f);
    } catch (const std::exception& e) {
        f.done = true;
        f.worker->faulted = true;
        fault_once(where(&f) + ": " + e.what());
    }
    f.done = true;
    to_scheduler(f);
    abort();  // never resumed
}

void init_fiber(Fiber& f, Worker& w) {
    if (!f.stack) {
        std::lock_guard<std::mutex> lock(g_stacks_mu);
        if (!g_stacks.empty()) f.stack = g_stacks.back(), g_stacks.pop_back();
    }
    if (!f.stack) {  // kStack-aligned (stack_top() rounds the stack pointer down), the rest of the mapping returned
        const size_t len = 2 * kStack;
        void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) throw std::runtime_error("CUDA emulator: out of memory for thread stacks");
        unsigned char* lo = (unsigned char*)p;
        unsigned char* base = (unsigned char*)(((uintptr_t)lo + kGuard + kStack - 1) & ~(kStack - 1));
        if (base - kGuard > lo) munmap(lo, base - kGuard - lo);
        if (base + kStack < lo + len) munmap(base + kStack, lo + len - base - kStack);
        mprotect(base - kGuard, kGuard, PROT_NONE);  // overflow faults instead of corrupting a neighbour
        f.stack = base;
    }
#ifdef EMU_ASAN
    __asan_unpoison_memory_region(f.stack, kStack);  // redzones left by the frames of the last thread here
#endif
    f.worker = &w;
    // the top two words: the Thread (threadIdx, blockIdx) and the Fiber, for self() and me()
    void** slots = (void**)(f.stack + kStack) - 2;
    slots[0] = &f.t;
    slots[1] = &f;
    // frame popped by fastllm_emu_switch: mxcsr|fcw, r15, r14, r13, r12, rbx, rbp, return address (fiber_entry)
    uint64_t* top = (uint64_t*)slots;  // 16-byte aligned
    uint64_t* sp = top - 9;
    sp[0] = 0x1f80ull | (0x037full << 32);
    for (int i = 1; i <= 6; i++) sp[i] = 0;
    sp[7] = (uint64_t)(uintptr_t)&fiber_entry;
    sp[8] = 0;
    f.sp = sp;
    f.done = false;
    f.waiting = nullptr;
    f.copies.clear();
    f.committed = 0;
    f.issued = 0;
}

void resume(Worker& w, Fiber& f) {
    w.cur = &f;
#ifdef EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, kStack);
#endif
    fastllm_emu_switch(&w.sched_sp, f.sp);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    w.cur = nullptr;
}

std::string waiting_summary(const Worker& w) {
    std::map<std::string, int> counts;
    for (int i = 0; i < w.block.n; i++)
        if (!w.fibers[i].done) counts[w.fibers[i].waiting ? w.fibers[i].waiting : "running"]++;
    std::string s;
    for (auto& [k, v] : counts) s += (s.empty() ? "" : ", ") + std::to_string(v) + " at " + k;
    return s;
}

bool run_block(Worker& w, uint3 block_idx) {  // false after a fault (g_error says what)
    Block& b = w.block;
    const int n = (int)(g_block_dim.x * g_block_dim.y * g_block_dim.z);
    if ((int)w.fibers.size() < n) w.fibers.resize(n);
    b.n = b.live = n;
    b.bar_arrived = 0;
    b.bar_gen = 0;
    b.warps.assign((n + 31) / 32, Warp{});
    for (int i = 0; i < n; i++) {
        Fiber& f = w.fibers[i];
        init_fiber(f, w);
        f.linear = i;
        f.warp = i / 32;
        f.lane = i % 32;
        f.t.idx = {i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y, i / (g_block_dim.x * g_block_dim.y)};
        f.t.block_idx = block_idx;
        b.warps[f.warp].exist |= 1u << f.lane;
    }
    for (auto& wp : b.warps) wp.live = wp.exist;
    const int mode = settings().order, nw = (int)b.warps.size();
    std::vector<int> order(n);
    for (int i = 0; i < n; i++) order[i] = mode == 1 ? n - 1 - i : i;
    static thread_local std::mt19937 rng(1234);
    auto resume_range = [&](int from, int to) {  // resumes the live fibers order[from..to) once each
        for (int k = from; k < to; k++)
            if (!w.fibers[order[k]].done) {
                resume(w, w.fibers[order[k]]);
                if (w.faulted) return false;
            }
        return true;
    };
    while (b.live > 0) {
        if (mode == 2) std::shuffle(order.begin(), order.end(), rng);
        const unsigned long before = w.progress;
        if (mode <= 2) {
            if (!resume_range(0, n)) return false;
        } else {
            for (int k = 0; k < nw; k++) {
                const int ww = mode == 4 ? nw - 1 - k : k;
                for (unsigned long last = ~0ul; last != w.progress;) {  // until the warp makes no progress
                    last = w.progress;
                    if (!resume_range(ww * 32, std::min(n, ww * 32 + 32))) return false;
                }
            }
        }
        if (g_abort) return false;  // another worker faulted
        if (b.live > 0 && w.progress == before) {
            fault_once(std::string("deadlock in block (") + std::to_string(block_idx.x) + "," +
                       std::to_string(block_idx.y) + "," + std::to_string(block_idx.z) + "): " + waiting_summary(w));
            return false;
        }
    }
    return true;
}

std::map<const void*, int>& func_smem() {
    static std::map<const void*, int> m;
    return m;
}

}  // namespace

// ---- API used by the translated kernels
[[noreturn]] void fault(const char* what) { throw Fault(what); }

int lane_id() { return me().lane; }

void syncthreads() {
    Fiber& f = me();
    Block& b = f.worker->block;
    const unsigned gen = b.bar_gen;
    f.waiting = "__syncthreads";
    b.bar_arrived++;
    f.worker->progress++;
    if (b.bar_arrived == b.live) {
        b.bar_arrived = 0;
        b.bar_gen++;
    } else {
        while (b.bar_gen == gen) to_scheduler(f);
    }
    f.waiting = nullptr;
}

const uint32_t* warp_exchange(unsigned mask, const uint32_t* mine, int words, const char* op,
                              void (*combine)(uint32_t* all)) {
    Fiber& f = me();
    Warp& w = f.worker->block.warps[f.warp];
    auto bad = [&](const std::string& why) { throw Fault(std::string(op) + ": " + why); };
    if (words > 8) bad("more than 8 words per lane");
    if (!(mask >> f.lane & 1u)) bad("the calling lane is not in the mask");
    if (mask & ~w.exist) bad("the mask names lanes the block does not have (a partial warp)");
    if (mask & ~w.live) bad("the mask names lanes that have exited");
    if (w.arrived == 0) {
        w.mask = mask;
        w.op = op;
        w.expected = mask == 0xffffffffu ? 32 : __builtin_popcount(mask);
    } else if (w.mask != mask || w.op != op) {
        bad(std::string("lanes of one warp meet at different collectives (") + w.op + " and " + op +
            ") or with different masks");
    }
    const int slot = w.gen & 1;
    std::memcpy(w.buf[slot] + f.lane * words, mine, words * sizeof(uint32_t));
    const unsigned gen = w.gen;
    f.waiting = op;
    w.arrived++;
    f.worker->progress++;
    if (w.arrived == w.expected) {
        if (combine) combine(w.buf[slot]);
        w.arrived = 0;
        w.gen++;
    } else {
        while (w.gen == gen) to_scheduler(f);
    }
    f.waiting = nullptr;
    return w.buf[slot];
}

void syncwarp(unsigned mask) {
    uint32_t none = 0;
    warp_exchange(mask, &none, 1, "__syncwarp");
}

void* dynamic_smem() { return me().worker->smem + g_dyn_off; }
uint32_t smem_offset(const void* p) {
    const ptrdiff_t d = (const unsigned char*)p - me().worker->smem;
    if (d < INT32_MIN || d > INT32_MAX) fault("__cvta_generic_to_shared: not a shared-memory address");
    return (uint32_t)(int32_t)d;
}
void* smem_pointer(uint32_t offset) { return me().worker->smem + (int32_t)offset; }

void cp_async(uint32_t dst, const void* src, int bytes, int src_bytes) {
    Fiber& f = me();
    if ((int32_t)dst % bytes != 0) fault("cp.async: shared destination not aligned to the copy size");
    if (src_bytes < 0 || src_bytes > bytes) fault("cp.async: src-size outside 0..cp-size");
    if (src_bytes > 0 && (uintptr_t)src % bytes != 0) fault("cp.async: global source not aligned to the copy size");
    Copy c{(unsigned char*)smem_pointer(dst), (const unsigned char*)src, bytes, src_bytes, -1};
    f.copies.push_back(c);
    bool eager = settings().copies == 1;
    if (settings().copies == 2) {  // splitmix64 of (block, thread, copy number)
        const uint3 b = f.t.block_idx;
        uint64_t z = (((uint64_t)b.z * g_grid_dim.y + b.y) * g_grid_dim.x + b.x) * 0x9E3779B97F4A7C15ull +
                     (uint64_t)f.linear * 0xBF58476D1CE4E5B9ull + f.issued++;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        eager = (z ^ (z >> 31)) & 1;
    }
    if (eager) {
        f.copies.back().group = 0;
        run_copies(f, 0);
    }
}
void cp_async_commit() {
    Fiber& f = me();
    f.committed++;
    for (auto& c : f.copies)
        if (c.group < 0) c.group = f.committed;
}
void cp_async_wait(int n) {
    Fiber& f = me();
    run_copies(f, f.committed - n);
}

bool is_device_pointer(const void* p) { return in_device(p, 0); }

void bad_pointer_arg(const char* name, int index) {
    set_error(cudaErrorInvalidValue, std::string("an illegal memory access was encountered (") + name +
                                         ": argument " + std::to_string(index) +
                                         " is a pointer outside every device allocation)");
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
    if (value < 0 || (size_t)value > settings().smem_optin())
        return set_error(cudaErrorInvalidValue, "invalid argument (cudaFuncSetAttribute: " + std::to_string(value) +
                                                    " bytes of dynamic shared memory, the device allows " +
                                                    std::to_string(settings().smem_optin()) + ")");
    func_smem()[kernel] = value;
    return cudaSuccess;
}

void run_grid(const char* name, const void* kernel, const LaunchCfg& cfg, Body body) {
    if (g_worker.cur) throw Fault("a kernel launched from inside a kernel");
    const dim3 g = cfg.grid, b = cfg.block;
    const uint64_t threads = (uint64_t)b.x * b.y * b.z;
    auto refuse = [&](cudaError_t e, const std::string& why) {
        set_error(e, std::string(e == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                                                                    : "invalid argument") +
                         " (" + name + ": " + why + ")");
    };
    if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535)
        return refuse(cudaErrorInvalidConfiguration, "grid (" + std::to_string(g.x) + "," + std::to_string(g.y) +
                                                         "," + std::to_string(g.z) + ")");
    if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64)
        return refuse(cudaErrorInvalidConfiguration, "block (" + std::to_string(b.x) + "," + std::to_string(b.y) +
                                                         "," + std::to_string(b.z) + ")");
    size_t allowed = 48 * 1024;
    auto it = func_smem().find(kernel);
    if (it != func_smem().end()) allowed = std::max<size_t>(allowed, it->second);
    if (cfg.smem > allowed)
        return refuse(cudaErrorInvalidValue, std::to_string(cfg.smem) + " bytes of dynamic shared memory, " +
                                                 std::to_string(allowed) + " allowed for this kernel");
    if (settings().trace)
        fprintf(stderr, "emu launch %s grid (%u,%u,%u) block (%u,%u,%u) smem %zu\n", name, g.x, g.y, g.z, b.x, b.y, b.z,
                cfg.smem);
    g_grid_dim = g;
    g_block_dim = b;
    g_body = body;
    g_dyn_off = (kSmemCap - cfg.smem) & ~(size_t)127;
    g_abort = false;
    const uint64_t nblocks = (uint64_t)g.x * g.y * g.z;
    std::atomic<uint64_t> next{0};
    auto work = [&] {
        Worker& w = g_worker;
        w.faulted = false;
        for (uint64_t i; !g_abort && (i = next++) < nblocks;) {
            std::memset(w.smem + g_dyn_off, 0xff, kSmemCap - g_dyn_off);  // NaN: catches reads never written
            if (!run_block(w, {(unsigned)(i % g.x), (unsigned)(i / g.x % g.y), (unsigned)(i / ((uint64_t)g.x * g.y))}))
                break;
        }
    };
    const int workers = (int)std::min<uint64_t>(settings().threads, nblocks);
    std::vector<std::thread> pool;
    for (int w = 1; w < workers; w++)
        pool.emplace_back([&] {
            work();
            std::lock_guard<std::mutex> lock(g_stacks_mu);  // hand the stacks back before the thread ends
            for (Fiber& f : g_worker.fibers) g_stacks.push_back(f.stack);
            g_worker.fibers.clear();
        });
    work();
    for (auto& t : pool) t.join();
    if (g_abort) {
        std::lock_guard<std::mutex> lock(g_error_mu);
        g_message = std::string(name) + ": " + g_message;
    }
}

}  // namespace emu

// ---- runtime API
using emu::set_error;

cudaError_t cudaGetDeviceCount(int* n) {
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
    if (device != 0) return set_error(cudaErrorInvalidDevice, "invalid device ordinal");
    std::memset(prop, 0, sizeof *prop);
    std::snprintf(prop->name, sizeof prop->name, "fastllm CUDA emulator");
    prop->major = emu::settings().arch / 10;
    prop->minor = 0;
    prop->totalGlobalMem = (size_t)80 << 30;
    prop->multiProcessorCount = emu::settings().sms();
    prop->sharedMemPerBlock = 48 * 1024;
    prop->sharedMemPerBlockOptin = emu::settings().smem_optin();
    prop->maxThreadsPerBlock = 1024;
    prop->warpSize = 32;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
    return device == 0 ? cudaSuccess : set_error(cudaErrorInvalidDevice, "invalid device ordinal");
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
    *value = attr == cudaDevAttrMultiProcessorCount ? emu::settings().sms() : (int)emu::settings().smem_optin();
    return cudaSuccess;
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
    *p = nullptr;
    if (bytes > ((size_t)80 << 30)) return set_error(cudaErrorMemoryAllocation, "out of memory");
    void* q = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (!q) return set_error(cudaErrorMemoryAllocation, "out of memory");
    std::memset(q, 0xff, bytes);  // NaN: device memory is not zeroed
    emu::allocations()[(uintptr_t)q] = bytes;
    *p = q;
    return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    auto& m = emu::allocations();
    auto it = m.find((uintptr_t)p);
    if (it == m.end()) return set_error(cudaErrorInvalidValue, "invalid argument (cudaFree of a pointer cudaMalloc did not return)");
    m.erase(it);
    std::free(p);
    return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int) {
    *pool = nullptr;
    return cudaSuccess;
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    const bool dd = emu::in_device(dst, bytes), sd = emu::in_device(src, bytes);
    const bool ok = kind == cudaMemcpyHostToDevice   ? dd && !sd
                    : kind == cudaMemcpyDeviceToHost ? sd && !dd
                    : kind == cudaMemcpyDeviceToDevice ? dd && sd
                                                       : true;
    if (!ok)
        return set_error(cudaErrorInvalidValue, "invalid argument (cudaMemcpy of " + std::to_string(bytes) +
                                                    " bytes: a pointer is not where the copy kind says, or the "
                                                    "range runs past its allocation)");
    std::memmove(dst, src, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
    return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
    if (!emu::in_device(p, bytes))
        return set_error(cudaErrorInvalidValue, "invalid argument (cudaMemset outside a device allocation)");
    std::memset(p, value, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) { return cudaMemset(p, value, bytes); }
cudaError_t cudaDeviceSynchronize() { return cudaGetLastError(); }  // launches ran synchronously
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaGetLastError(); }
cudaError_t cudaGetLastError() {
    std::lock_guard<std::mutex> lock(emu::g_error_mu);
    cudaError_t e = emu::g_error;
    emu::g_error = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError() { return emu::g_error; }
const char* cudaGetErrorString(cudaError_t err) {
    if (err == cudaSuccess) return "no error";
    if (!emu::g_message.empty()) return emu::g_message.c_str();
    return "CUDA emulator error";
}
