// The one owner of a device's data fds. JS never sees or passes an fd: it
// holds a session id. An fd is closed exactly once: when its session is
// closed, when a newer session replaces it (a SET that opens a data fd ends
// every earlier session, as the uAPI does), or when the device closes.
// A session in use by a job on another thread is closed when that job lets
// go of it, so no thread ever reads or ioctls an fd number that was closed
// (and perhaps reused) under it.
//
// Thread-safe. Closing calls the backend's CloseDataFd, which may block, so
// only worker threads end sessions; the JS thread only looks.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "backend.h"

namespace vfio {

class SessionTable {
 public:
  enum class Status { kUnknown, kOpen, kClosed };

  explicit SessionTable(std::shared_ptr<DeviceBackend> backend) : backend_(std::move(backend)) {}

  // Worker: a SET returned `fd`. Ends every earlier session and returns the
  // new session's id, or 0 (and closes the fd) when the table is closed.
  uint32_t Add(int fd) {
    std::vector<int> to_close;
    uint32_t id = 0;
    {
      std::lock_guard<std::mutex> l(mu_);
      for (auto& kv : entries_) EndLocked(kv.second, &to_close);
      if (closed_) to_close.push_back(fd);
      else {
        id = next_id_++;
        if (next_id_ == 0) next_id_ = 1;  // ids are never 0
        entries_[id] = Entry{fd, 0, false, false};
      }
      PruneLocked();
    }
    CloseFds(to_close);
    return id;
  }

  // Worker: the fd of an open session for the duration of a job, or -1.
  int Acquire(uint32_t id) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = entries_.find(id);
    if (it == entries_.end() || it->second.ending) return -1;
    it->second.busy++;
    return it->second.fd;
  }

  // Worker: the job is done with the fd.
  void Release(uint32_t id) {
    std::vector<int> to_close;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = entries_.find(id);
      if (it == entries_.end()) return;
      Entry& e = it->second;
      if (--e.busy == 0 && e.ending && !e.fd_closed) {
        e.fd_closed = true;
        to_close.push_back(e.fd);
      }
      PruneLocked();
    }
    CloseFds(to_close);
  }

  // Worker: ends one session.
  void End(uint32_t id) {
    std::vector<int> to_close;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = entries_.find(id);
      if (it != entries_.end()) EndLocked(it->second, &to_close);
      PruneLocked();
    }
    CloseFds(to_close);
  }

  // Worker: ends every session; later SETs' fds are closed as they come.
  void CloseAll() {
    std::vector<int> to_close;
    {
      std::lock_guard<std::mutex> l(mu_);
      closed_ = true;
      for (auto& kv : entries_) EndLocked(kv.second, &to_close);
      PruneLocked();
    }
    CloseFds(to_close);
  }

  // Any thread.
  Status StatusOf(uint32_t id) {
    std::lock_guard<std::mutex> l(mu_);
    if (id == 0 || id >= next_id_) return Status::kUnknown;
    auto it = entries_.find(id);
    return it == entries_.end() || it->second.ending ? Status::kClosed : Status::kOpen;
  }

  // Any thread: fds not closed yet (for leak checks).
  std::vector<int> OpenFds() {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<int> out;
    for (auto& kv : entries_)
      if (!kv.second.fd_closed) out.push_back(kv.second.fd);
    return out;
  }

 private:
  struct Entry {
    int fd;
    int busy;        // jobs using the fd right now
    bool ending;     // no new job may use it
    bool fd_closed;  // closed (exactly once)
  };

  void EndLocked(Entry& e, std::vector<int>* to_close) {
    e.ending = true;
    if (e.busy == 0 && !e.fd_closed) {
      e.fd_closed = true;
      to_close->push_back(e.fd);
    }
  }

  void PruneLocked() {
    for (auto it = entries_.begin(); it != entries_.end();)
      it = it->second.fd_closed ? entries_.erase(it) : std::next(it);
  }

  void CloseFds(const std::vector<int>& fds) {
    for (int fd : fds) backend_->CloseDataFd(fd);
  }

  std::shared_ptr<DeviceBackend> backend_;
  std::mutex mu_;
  std::map<uint32_t, Entry> entries_;
  uint32_t next_id_ = 1;
  bool closed_ = false;
};

}  // namespace vfio
