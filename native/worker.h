// A dedicated thread per device role (control ioctls, data-fd I/O). Jobs run
// in submission order off the JS thread; their completions run on the JS
// thread through a thread-safe function. Per-device threads, rather than the
// libuv pool, let transitions of many devices run truly in parallel (16
// devices with 50 ms arcs would otherwise queue behind the pool's 4 threads)
// and keep slow ioctls from starving the application's fs and dns work.
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

  // JS thread only.
  void Submit(Napi::Env env, Exec exec, Done done) {
    if (pending_++ == 0) tsfn_.Ref(env);
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back(new Job{std::move(exec), std::move(done), shared_from_this()});
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

 private:
  static void CallJs(Napi::Env env, Napi::Function, void*, Job* job) {
    std::shared_ptr<Worker> w = job->owner;
    if (env != nullptr) {
      job->done(env);
      if (--w->pending_ == 0 && !w->stopping_requested()) w->tsfn_.Unref(env);
    }
    delete job;
  }
  using Tsfn = Napi::TypedThreadSafeFunction<void, Job, &Worker::CallJs>;

  static void Finalize(Napi::Env env, std::shared_ptr<Worker>* holder, void*) {
    std::shared_ptr<Worker> w = *holder;
    delete holder;
    if (w->finalized_) w->finalized_(env);
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
        cv_.wait(l, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) break;
        job = queue_.front();
        queue_.pop_front();
      }
      job->exec();
      if (tsfn_.BlockingCall(job) != napi_ok) delete job;
    }
    tsfn_.Release();
  }

  Tsfn tsfn_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job*> queue_;
  bool stopping_ = false;
  size_t pending_ = 0;  // JS thread only
  Done finalized_;      // JS thread only
};

}  // namespace vfio
