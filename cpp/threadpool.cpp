// Persistent worker pool. See threadpool.h.
#include "threadpool.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <set>
#include <stdexcept>
#include <utility>

#if defined(__linux__)
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

long current_pid() {
#if defined(__linux__)
    return (long)getpid();
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

void ThreadPool::run_tasks() {
    for (;;) {
        const int task = next_task_.fetch_add(1, std::memory_order_relaxed);
        if (task >= n_tasks_) return;
        fn_(ctx_, task);
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
        if (worker_id >= participants_) continue;
        lk.unlock();
        run_tasks();
        lk.lock();
        if (--pending_ == 0) {
            unfinished_.store(0, std::memory_order_release);
            done_.notify_one();
        }
    }
}

void ThreadPool::parallel_for(int n_tasks, TaskFn fn, void* ctx, int n_threads) {
    if (n_tasks <= 0) return;
    std::lock_guard<std::mutex> job(job_mutex_);
    if (n_threads <= 0 || n_threads > size()) n_threads = size();
    if (n_threads > n_tasks) n_threads = n_tasks;
    if (n_threads == 1 || current_pid() != owner_pid_) {
        for (int t = 0; t < n_tasks; ++t) fn(ctx, t);
        return;
    }
    {
        std::lock_guard<std::mutex> lk(mutex_);
        fn_ = fn;
        ctx_ = ctx;
        n_tasks_ = n_tasks;
        next_task_.store(0, std::memory_order_relaxed);
        participants_ = n_threads - 1;
        pending_ = participants_;
        unfinished_.store(participants_, std::memory_order_relaxed);
        ++generation_;
        published_.store(generation_, std::memory_order_release);
    }
    wake_.notify_all();
    run_tasks();
    wait_awake([&] { return unfinished_.load(std::memory_order_acquire) == 0; });  // the workers' last tasks
    std::unique_lock<std::mutex> lk(mutex_);
    done_.wait(lk, [&] { return pending_ == 0; });
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

}  // namespace ktlab
