// Persistent worker pool. See threadpool.h.
#include "threadpool.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <set>
#include <stdexcept>
#include <utility>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#endif

namespace ktlab {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

// How long a waiting thread stays awake before it sleeps on the condition variable
// (KTLAB_POOL_SPIN_US overrides, read once). On a VM a sleeping vCPU takes ~1 ms to wake
// (measured here: a 16-token MoE layer ran 1.3 ms slower when its pool had slept through
// the router's 0.2 ms), far longer than the gaps between one step's kernel calls. The
// first kPauseSpin of the wait spins on `pause`; the rest yields the core to anything else
// runnable (the server's event loop, torch's threads) while keeping the vCPU busy.
constexpr auto kPauseSpin = std::chrono::microseconds(50);

std::chrono::microseconds awake_time() {
    static const std::chrono::microseconds awake = [] {
        const char* env = std::getenv("KTLAB_POOL_SPIN_US");
        return std::chrono::microseconds(env ? std::atol(env) : 5000);
    }();
    return awake;
}

// Waits until done() or awake_time() has passed; returns done().
template <class Done>
bool wait_awake(Done&& done) {
    const auto start = std::chrono::steady_clock::now();
    const auto budget = awake_time();
    for (int i = 0;; ++i) {
        if (done()) return true;
        if ((i & 63) != 63) {
            cpu_relax();
            continue;
        }
        const auto waited = std::chrono::steady_clock::now() - start;
        if (waited > budget) return done();
        if (waited > kPauseSpin) std::this_thread::yield();
    }
}

constexpr int kMaxThreads = 512;

// cursor_ = generation (24 bits) | task count (20 bits) | next task (20 bits). Bigger jobs run
// as several jobs of at most kMaxJobTasks tasks.
constexpr int kTaskBits = 20;
constexpr uint64_t kTaskMask = (uint64_t(1) << kTaskBits) - 1;
constexpr int kMaxJobTasks = (int)kTaskMask;
constexpr uint64_t kGenMask = (uint64_t(1) << (64 - 2 * kTaskBits)) - 1;

uint64_t pack_cursor(uint64_t gen, int n_tasks) {
    return ((gen & kGenMask) << (2 * kTaskBits)) | ((uint64_t)n_tasks << kTaskBits);
}

struct Offset {  // one part of a job too big for one cursor: its tasks start at `first`
    ThreadPool::TaskFn fn;
    void* ctx;
    int first;
};

// getpid() is a system call (~0.2 us on this VM) and run_job asks it on every job (dozens per
// decode step): cached, and set anew in a forked child by a pthread_atfork handler.
std::atomic<long> g_pid{0};

long current_pid() {
#if defined(__linux__)
    long pid = g_pid.load(std::memory_order_relaxed);
    if (pid == 0) {
        static std::once_flag registered;
        std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { g_pid.store((long)getpid()); }); });
        pid = (long)getpid();
        g_pid.store(pid, std::memory_order_relaxed);
    }
    return pid;
#else
    return 0;
#endif
}

}  // namespace

ThreadPool::ThreadPool(int n_threads) : owner_pid_(current_pid()) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads > kMaxThreads) n_threads = kMaxThreads;
    grow(n_threads);
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lk(mutex_);
        stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
}

void ThreadPool::grow(int n_threads) {
    if (n_threads > kMaxThreads) n_threads = kMaxThreads;
    std::lock_guard<std::mutex> job(job_mutex_);  // no job runs while workers are added
    uint64_t gen;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        gen = generation_;
    }
    while (size() < n_threads) {
        const int id = (int)workers_.size();
        workers_.emplace_back([this, id, gen] { worker_loop(id, gen); });
    }
}

void ThreadPool::run_tasks(uint64_t gen) {
    uint64_t c = cursor_.load(std::memory_order_acquire);
    for (;;) {
        const int n = (int)((c >> kTaskBits) & kTaskMask), task = (int)(c & kTaskMask);
        if ((c >> (2 * kTaskBits)) != (gen & kGenMask) || task >= n) return;  // another job's, or none left
        if (!cursor_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        fn_(ctx_, task);  // the claim succeeded: this job is live until the task is done
        if (done_tasks_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
            std::lock_guard<std::mutex> lk(mutex_);  // the caller may be asleep on done_
            done_.notify_all();
            return;
        }
        c = cursor_.load(std::memory_order_acquire);
    }
}

void ThreadPool::worker_loop(int worker_id, uint64_t seen) {
    for (;;) {
        // Stay awake a while: back-to-back jobs (a step's kernel calls) skip the sleep/wake round trip.
        wait_awake([&] { return published_.load(std::memory_order_acquire) != seen; });
        std::unique_lock<std::mutex> lk(mutex_);
        wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        const bool take_part = worker_id < participants_;
        lk.unlock();
        if (take_part) run_tasks(seen);  // finds nothing when the others have done it all meanwhile
    }
}

void ThreadPool::parallel_for(int n_tasks, TaskFn fn, void* ctx, int n_threads) {
    if (n_tasks <= kMaxJobTasks) {
        run_job(n_tasks, fn, ctx, n_threads);
        return;
    }
    for (int first = 0; first < n_tasks; first += kMaxJobTasks) {
        Offset part{fn, ctx, first};
        auto shifted = [](void* p, int task) {
            const Offset& o = *static_cast<Offset*>(p);
            o.fn(o.ctx, o.first + task);
        };
        run_job(std::min(kMaxJobTasks, n_tasks - first), +shifted, &part, n_threads);
    }
}

void ThreadPool::run_job(int n_tasks, TaskFn fn, void* ctx, int n_threads) {
    if (n_tasks <= 0) return;
    std::lock_guard<std::mutex> job(job_mutex_);
    if (n_threads <= 0 || n_threads > size()) n_threads = size();
    if (n_threads > n_tasks) n_threads = n_tasks;
    if (n_threads == 1 || current_pid() != owner_pid_) {
        for (int t = 0; t < n_tasks; ++t) fn(ctx, t);
        return;
    }
    uint64_t gen;
    {
        std::lock_guard<std::mutex> lk(mutex_);
        fn_ = fn;
        ctx_ = ctx;
        done_tasks_.store(0, std::memory_order_relaxed);
        participants_ = n_threads - 1;
        gen = ++generation_;
        cursor_.store(pack_cursor(gen, n_tasks), std::memory_order_release);
        published_.store(gen, std::memory_order_release);
    }
    wake_.notify_all();
    run_tasks(gen);
    const auto all_done = [&] { return done_tasks_.load(std::memory_order_acquire) == n_tasks; };
    if (wait_awake(all_done)) return;  // the tasks the workers claimed are done
    std::unique_lock<std::mutex> lk(mutex_);
    done_.wait(lk, all_done);
}

// ---- AsyncCall ------------------------------------------------------------------------------

struct AsyncCall::State {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
    std::exception_ptr error;
};

namespace {

// The background thread behind every AsyncCall: a FIFO of jobs. Created on first use, and
// again in a forked child (whose copy has no thread); never destroyed (it may hold jobs
// at exit, and joining it from a static destructor would be fragile).
class Dispatcher {
public:
    static Dispatcher& get() {
        static std::mutex m;
        static Dispatcher* instance = nullptr;
        std::lock_guard<std::mutex> lk(m);
        if (!instance || instance->pid_ != current_pid()) instance = new Dispatcher();  // old one leaks in a child
        return *instance;
    }

    void post(std::function<void()> job) {
        {
            std::lock_guard<std::mutex> lk(mutex_);
            jobs_.push_back(std::move(job));
        }
        cv_.notify_one();
    }

private:
    Dispatcher() : pid_(current_pid()) { std::thread([this] { loop(); }).detach(); }

    void loop() {
        for (;;) {
            std::function<void()> job;
            {
                std::unique_lock<std::mutex> lk(mutex_);
                cv_.wait(lk, [&] { return !jobs_.empty(); });
                job = std::move(jobs_.front());
                jobs_.pop_front();
            }
            job();
        }
    }

    long pid_;
    std::mutex mutex_;
    std::condition_variable cv_;
    std::deque<std::function<void()>> jobs_;
};

}  // namespace

void AsyncCall::start(std::function<void()> fn) {
    if (state_) throw std::logic_error("a call is already pending: sync() it before submitting another");
    auto state = std::make_shared<State>();
    Dispatcher::get().post([state, fn = std::move(fn)] {
        std::exception_ptr error;
        try {
            fn();
        } catch (...) {
            error = std::current_exception();
        }
        {
            std::lock_guard<std::mutex> lk(state->mutex);
            state->error = error;
            state->done = true;
        }
        state->cv.notify_all();
    });
    state_ = std::move(state);
}

void AsyncCall::wait() {
    if (!state_) throw std::logic_error("no call pending: submit() first");
    std::shared_ptr<State> state = std::move(state_);
    state_.reset();
    std::unique_lock<std::mutex> lk(state->mutex);
    state->cv.wait(lk, [&] { return state->done; });
    if (state->error) std::rethrow_exception(state->error);
}

AsyncCall::~AsyncCall() {
    if (!state_) return;
    try {
        wait();
    } catch (...) {
    }
}

namespace {

int count_physical_cores() {
    int logical = (int)std::thread::hardware_concurrency();
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        logical = CPU_COUNT(&set);
        std::set<std::pair<int, int>> cores;  // (package, core)
        bool ok = true;
        for (int cpu = 0; cpu < CPU_SETSIZE && ok; ++cpu) {
            if (!CPU_ISSET(cpu, &set)) continue;
            int ids[2] = {-1, -1};
            const char* names[2] = {"physical_package_id", "core_id"};
            for (int k = 0; k < 2; ++k) {
                char path[128];
                std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/%s", cpu,
                              names[k]);
                FILE* f = std::fopen(path, "r");
                if (!f || std::fscanf(f, "%d", &ids[k]) != 1) ok = false;
                if (f) std::fclose(f);
            }
            cores.insert({ids[0], ids[1]});
        }
        if (ok && !cores.empty()) return (int)cores.size();
    }
#endif
    return logical > 0 ? logical : 1;
}

}  // namespace

// Counted once: reading the topology from sysfs costs ~40 us, and every kernel call given
// threads <= 0 asks (17 times per decode step of a 4-layer model).
int default_num_threads() {
    static const int cores = count_physical_cores();
    return cores;
}

ThreadPool& global_pool(int min_threads) {
    static ThreadPool pool(default_num_threads());
    static std::mutex grow_mutex;
    std::lock_guard<std::mutex> lk(grow_mutex);
    if (min_threads > pool.size()) pool.grow(min_threads);
    return pool;
}

int64_t pool_self_check(int jobs, int n_tasks, int threads, bool ranges) {
    std::vector<std::atomic<int>> runs((size_t)std::max(n_tasks, 0));
    int64_t wrong = 0;
    for (int j = 0; j < jobs; ++j) {
        for (auto& r : runs) r.store(0, std::memory_order_relaxed);
        auto count = [&](int task) { runs[(size_t)task].fetch_add(1, std::memory_order_relaxed); };
        if (ranges) {
            run_parallel_ranges(n_tasks, threads, count);
        } else {
            run_parallel(n_tasks, threads, count);
        }
        for (auto& r : runs) wrong += r.load(std::memory_order_relaxed) != 1;  // every task once, all done on return
    }
    return wrong;
}

}  // namespace ktlab
