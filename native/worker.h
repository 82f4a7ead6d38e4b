// A dedicated thread per device role (control ioctls, data-fd I/O). Jobs run
// in submission order off the JS thread; their completions run on the JS
// thread through a thread-safe function. Per-device threads, rather than the
// libuv pool, let transitions of many devices run truly in parallel (16
// devices with 50 ms arcs would otherwise queue behind the pool's 4 threads)
// and keep slow ioctls from starving the application's fs and dns work.
//
// Environment teardown (a worker_thread exiting, or the process): Node frees
// the thread-safe function right after the cleanup hooks, so Abandon() (from
// the addon's cleanup hook) makes the thread stop touching it first. Jobs that
// can no longer complete are leaked on purpose: they hold Node-API references
// that may only be released on their environment's thread.
#pragma once

#include <napi.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace vfio {

class Worker : public std::enable_shared_from_this<Worker> {
 public:
  using Exec = std::function<void()>;
  using Done = std::function<void(Napi::Env)>;

  struct Job {
    Exec exec;
    Done done;
    std::shared_ptr<Worker> owner;
  };

  static std::shared_ptr<Worker> Start(Napi::Env env, const char* name) {
    auto w = std::shared_ptr<Worker>(new Worker());
    w->tsfn_ = Tsfn::New(env, name, 0, 1, nullptr, &Worker::Finalize, new std::shared_ptr<Worker>(w));
    w->tsfn_.Unref(env);  // idle workers do not keep the process alive
    std::shared_ptr<Worker> self = w;
    std::thread([self] { self->Run(); }).detach();
    return w;
  }

  // JS thread only. `exec` must not throw (the addon's Run() catches).
  void Submit(Napi::Env env, Exec exec, Done done) {
    auto* job = new Job{std::move(exec), std::move(done), shared_from_this()};
    if (pending_++ == 0) tsfn_.Ref(env);
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back(job);
    cv_.notify_one();
  }

  // JS thread only: the thread exits once the queued jobs have run and
  // releases the thread-safe function; `finalized` runs on the JS thread
  // after that, when no thread can touch Node-API any more.
  void Shutdown(Napi::Env env, Done finalized) {
    finalized_ = std::move(finalized);
    tsfn_.Ref(env);  // keep the loop alive until finalization
    std::lock_guard<std::mutex> l(mu_);
    stopping_ = true;
    cv_.notify_one();
  }

  // The environment is going away (its cleanup hook, JS thread): from now on
  // the thread never touches the thread-safe function. It finishes the job
  // it is running, drops the queue (leaked, see above), runs `last` (no
  // Node-API) and exits. With `wait`, returns only once no job runs: a job
  // may be reading a Buffer whose memory the isolate frees right after the
  // cleanup hooks (ASan caught a write job doing so).
  void Abandon(Exec last, bool wait) {
    std::unique_lock<std::mutex> l(mu_);
    if (!abandoned_) {
      abandoned_ = true;
      last_ = std::move(last);
      queue_.clear();
      cv_.notify_all();
    }
    if (wait) cv_.wait(l, [&] { return !running_; });
  }

 private:
  static void CallJs(Napi::Env env, Napi::Function, void*, Job* job) {
    if (env == nullptr) return;  // the function is being torn down: leak, see above
    std::shared_ptr<Worker> w = job->owner;
    try {
      job->done(env);
    } catch (...) {
      // A completion never throws into Node (that would terminate); the
      // addon's completions catch their own errors already.
    }
    if (--w->pending_ == 0 && !w->stopping_requested()) w->tsfn_.Unref(env);
    delete job;
  }
  using Tsfn = Napi::TypedThreadSafeFunction<void, Job, &Worker::CallJs>;

  static void Finalize(Napi::Env env, std::shared_ptr<Worker>* holder, void*) {
    std::shared_ptr<Worker> w = *holder;
    delete holder;
    // Called and destroyed here, on the JS thread: it may hold references.
    Done finalized = std::move(w->finalized_);
    w->finalized_ = nullptr;
    if (finalized) {
      try {
        finalized(env);
      } catch (...) {
      }
    }
  }

  Worker() = default;

  bool stopping_requested() {
    std::lock_guard<std::mutex> l(mu_);
    return stopping_;
  }

  void Run() {
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return stopping_ || abandoned_ || !queue_.empty(); });
        if (abandoned_) break;
        if (queue_.empty()) break;
        job = queue_.front();
        queue_.pop_front();
        running_ = true;
      }
      try {
        job->exec();
      } catch (...) {
      }
      // The lock orders this call before Abandon(): once abandoned, the
      // thread-safe function may be gone.
      std::unique_lock<std::mutex> l(mu_);
      running_ = false;
      cv_.notify_all();
      if (abandoned_) break;
      if (tsfn_.BlockingCall(job) != napi_ok) {
        // Only while the environment is being torn down: wait for Abandon()
        // (the job is leaked on purpose, see above).
        cv_.wait(l, [&] { return abandoned_; });
        break;
      }
    }
    Exec last;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!abandoned_) {
        tsfn_.Release();
        return;
      }
      last = std::move(last_);
    }
    if (last) {
      try {
        last();
      } catch (...) {
      }
    }
  }

  Tsfn tsfn_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job*> queue_;
  bool stopping_ = false;
  bool abandoned_ = false;
  bool running_ = false;  // a job's exec is running
  Exec last_;
  size_t pending_ = 0;  // JS thread only
  Done finalized_;      // JS thread only
};

}  // namespace vfio
