#include "uapi.h"

#include <cerrno>

namespace vfio_uapi {

namespace {
constexpr uint8_t E = kStateError, S = kStateStop, R = kStateRunning, SC = kStateStopCopy,
                    RS = kStateResuming, RP = kStateRunningP2P, PC = kStatePreCopy,
                    PP = kStatePreCopyP2P;
}  // namespace

const uint8_t kNextStateTable[kNumStates][kNumStates] = {
    /*            to: ERROR STOP RUN  SC   RES  RP2P PC   PCP2P */
    /* ERROR   */ {E, E, E, E, E, E, E, E},
    /* STOP    */ {E, S, RP, SC, RS, RP, RP, RP},
    /* RUNNING */ {E, RP, R, RP, RP, RP, PC, RP},
    /* STOP_CP */ {E, S, S, SC, S, S, E, E},
    /* RESUME  */ {E, S, S, S, RS, S, S, S},
    /* RP2P    */ {E, S, R, S, S, RP, R, PP},
    /* PRECOPY */ {E, R, R, PP, R, R, PC, PP},
    /* PC_P2P  */ {E, RP, RP, SC, RP, RP, PC, PP},
};

int NextState(uint32_t cur, uint32_t target, uint64_t flags, uint32_t* next) {
  if (!StateSupported(cur, flags) || !StateSupported(target, flags)) return EINVAL;
  uint32_t n = kNextStateTable[cur][target];
  while (n != kStateError && !StateSupported(n, flags)) n = kNextStateTable[n][target];
  *next = n;
  return n == kStateError ? EINVAL : 0;
}

}  // namespace vfio_uapi
