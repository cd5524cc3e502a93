// A small persistent worker pool.
//
// parallel_for(n_tasks, fn, n_threads) runs fn(task) for every task in [0, n_tasks) on up to
// n_threads threads (the caller is one of them) and returns when all are done. Tasks are
// handed out one at a time from an atomic counter, so uneven tasks balance themselves, and
// a job ends when its tasks are done, not when every worker has checked in: a worker that
// wakes late (its core was taken by another process, as on a small machine where a server
// and its clients share the cores) finds nothing left to claim, and the caller has not
// waited for it.
// Waiting threads stay awake a few ms (spinning, then yielding) before they sleep on a
// condition variable: see awake_time() in threadpool.cpp.
//
// One job at a time: concurrent callers are serialized by a mutex. Calling parallel_for
// from inside a task would deadlock: don't.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace ktlab {

class ThreadPool {
public:
    using TaskFn = void (*)(void* ctx, int task);

    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    // Threads available to a job, the caller included.
    int size() const { return (int)workers_.size() + 1; }

    // Add workers until size() >= n_threads (waits for a running job to finish).
    void grow(int n_threads);

    // n_threads <= 0 or > size(): use size(). In a forked child (no workers there) the
    // tasks run on the caller alone.
    void parallel_for(int n_tasks, TaskFn fn, void* ctx, int n_threads = 0);

    template <class F>
    void parallel_for(int n_tasks, F&& f, int n_threads = 0) {
        using Fn = std::remove_reference_t<F>;
        auto trampoline = [](void* ctx, int task) { (*static_cast<Fn*>(ctx))(task); };
        parallel_for(n_tasks, +trampoline, (void*)&f, n_threads);
    }

private:
    void run_job(int n_tasks, TaskFn fn, void* ctx, int n_threads);
    void worker_loop(int worker_id, uint64_t seen);
    void run_tasks(uint64_t gen);

    std::vector<std::thread> workers_;
    long owner_pid_ = 0;     // process that started the workers
    std::mutex job_mutex_;   // one job at a time

    std::mutex mutex_;       // guards the fields below and the wake-ups
    std::condition_variable wake_;
    std::condition_variable done_;
    uint64_t generation_ = 0;
    bool stop_ = false;
    int participants_ = 0;   // workers (ids < participants_) that take part in this job

    std::atomic<uint64_t> published_{0};  // generation_ mirrored for the spin wait
    // The job's (generation, task count, next task) in one word: a claim is one compare-and-swap
    // that also checks the job, so a late worker can never take a task of the next job.
    std::atomic<uint64_t> cursor_{0};
    std::atomic<int> done_tasks_{0};      // tasks of the current job finished
    TaskFn fn_ = nullptr;                 // written before the cursor is published
    void* ctx_ = nullptr;
};

// One asynchronous call at a time (the KTransformers submit/sync pattern): start(fn) returns
// at once and fn runs on a persistent background thread shared by every AsyncCall (jobs
// run one after another, in submission order), so the submitting thread is never one of
// the workers and can go on (Python releases the GIL around the calls). wait() blocks
// until fn is done and rethrows what it threw.
class AsyncCall {
public:
    AsyncCall() = default;
    ~AsyncCall();  // waits for a pending call (its exception is dropped)
    AsyncCall(const AsyncCall&) = delete;
    AsyncCall& operator=(const AsyncCall&) = delete;

    // Throws std::logic_error while a call is pending (wait() first).
    void start(std::function<void()> fn);
    // Throws std::logic_error when no call is pending; otherwise rethrows fn's exception.
    void wait();
    bool pending() const { return state_ != nullptr; }

    struct State;  // completion flag + exception, shared with the background thread

private:
    std::shared_ptr<State> state_;
};

// Physical cores available to this process (SMT siblings counted once), at least 1.
int default_num_threads();

// Runs `jobs` jobs of n_tasks tasks on the global pool (through run_parallel_ranges when
// `ranges`, else run_parallel) and counts the tasks that did not run exactly once by the time
// their job returned (0 when the pool is right; a test of its handoff).
int64_t pool_self_check(int jobs, int n_tasks, int threads, bool ranges);

// The process-wide pool; it grows (never shrinks) to hold at least min_threads threads.
ThreadPool& global_pool(int min_threads);

// fn(task) for every task in [0, n_tasks) on up to `threads` threads of the global pool (the
// caller among them; threads <= 0: default_num_threads()); inline when one thread or one task.
template <class F>
void run_parallel(int n_tasks, int threads, F&& fn) {
    if (n_tasks <= 0) return;
    if (threads <= 0) threads = default_num_threads();
    if (threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; ++t) fn(t);
        return;
    }
    global_pool(threads).parallel_for(n_tasks, fn, threads);
}

// Like run_parallel, for tasks laid out in memory order: the tasks are split into one contiguous
// range per thread, each thread works through its own range in order (so consecutive tasks
// continue one stream for the hardware prefetcher, where tasks handed out one at a time
// interleave the threads and break every stream at each task), then helps the others from
// where they are (uneven tasks still balance).
template <class F>
void run_parallel_ranges(int n_tasks, int threads, F&& fn) {
    if (n_tasks <= 0) return;
    if (threads <= 0) threads = default_num_threads();
    if (threads > n_tasks) threads = n_tasks;
    if (threads == 1) {
        for (int t = 0; t < n_tasks; ++t) fn(t);
        return;
    }
    struct Range {
        alignas(64) std::atomic<int> next;
        int end;
    };
    std::vector<Range> ranges((size_t)threads);
    for (int p = 0; p < threads; ++p) {
        ranges[(size_t)p].next.store((int)((int64_t)n_tasks * p / threads), std::memory_order_relaxed);
        ranges[(size_t)p].end = (int)((int64_t)n_tasks * (p + 1) / threads);
    }
    global_pool(threads).parallel_for(threads, [&](int part) {
        for (int k = 0; k < threads; ++k) {  // own range first, then the next ones'
            Range& r = ranges[(size_t)((part + k) % threads)];
            for (int t = r.next.fetch_add(1, std::memory_order_relaxed); t < r.end;
                 t = r.next.fetch_add(1, std::memory_order_relaxed)) {
                fn(t);
            }
        }
    }, threads);
}

}  // namespace ktlab
