// The convergence policy: when to switch over, and the downtime to expect.
// Downtime is not only bytes over bandwidth: devices spend time on their
// transitions and on loading. The policy learns those times from what this
// migration has observed and adds them to the estimate.
import type { PendingBytes, StateHandler } from './handler.js';
import type { MigrationParameters } from './params.js';
import { MAX_REPORTED_MS, saneMs, sumBytes, transferMs } from './accounting.js';

export interface PolicyInputs {
  pending: PendingBytes[];
  measuredBandwidthBytesPerSec: number;
  params: MigrationParameters;
  switchoverAckRequired: boolean;
  switchoverAcked: boolean;
  iteration: number;
}

export interface PolicyDecision {
  switchover: boolean;
  reason: string;
  expectedDowntimeMs: number;
  /** Of which data-size-independent device time. */
  deviceTimeMs: number;
  remainingBytes: number;
  stopcopyBytes: number;
  precopyBytes: number;
  bandwidthBytesPerSec: number;
  stalledNow: boolean;
  suggestedDowntimeLimitMs: number | null;
  iterationBudgetBytes: number;
  idleWaitMs: number;
}

/** Time a device needs at switchover that does not depend on its data size, ms. */
export interface DeviceTimeSource {
  switchoverDeviceTimeMs?(): number;
}

export class DowntimePolicy {
  readonly handlers: (StateHandler & DeviceTimeSource)[];
  /** Destination-reported load times of the initial bytes, per section. */
  readonly initialLoadMs = new Map<number, number>();
  /** Destination-reported device time at switchover (its arcs), per section. */
  readonly destinationDeviceMs = new Map<number, number>();
  stalled = false;
  suggestedDowntimeLimitMs: number | null = null;
  #bestRemaining = Infinity;
  #sinceProgress = 0;

  constructor(handlers: StateHandler[]) {
    this.handlers = handlers as (StateHandler & DeviceTimeSource)[];
  }

  recordInitialLoad(section: number, loadMs: number): void {
    if (Number.isFinite(loadMs) && loadMs >= 0) this.initialLoadMs.set(section, loadMs);
  }

  recordDestinationDeviceTime(section: number, ms: number): void {
    if (Number.isFinite(ms) && ms >= 0) this.destinationDeviceMs.set(section, ms);
  }

  /** Device transitions run in parallel across devices: the slowest one counts. */
  deviceTimeMs(): number {
    let worst = 0;
    this.handlers.forEach((h, i) => {
      const own = h.switchoverDeviceTimeMs?.() ?? 0;
      const dest = this.destinationDeviceMs.get(i) ?? 0;
      worst = Math.max(worst, saneMs(own + dest));
    });
    return worst;
  }

  evaluate(input: PolicyInputs): PolicyDecision {
    const { params } = input;
    const stopcopyBytes = sumBytes(input.pending.map((p) => p.stopcopyBytes));
    const precopyBytes = sumBytes(input.pending.map((p) => p.precopyBytes));
    const remainingBytes = sumBytes(input.pending.map((p) => Math.max(p.precopyBytes, p.stopcopyBytes)));
    let bandwidth = params['avail-switchover-bandwidth'] > 0 ? params['avail-switchover-bandwidth'] : input.measuredBandwidthBytesPerSec;
    if (params['max-bandwidth'] > 0 && !(params['avail-switchover-bandwidth'] > 0)) bandwidth = bandwidth > 0 ? Math.min(bandwidth, params['max-bandwidth']) : params['max-bandwidth'];
    const deviceTimeMs = this.deviceTimeMs();
    const known = bandwidth > 0;
    const expectedDowntimeMs = known ? saneMs(transferMs(stopcopyBytes, bandwidth) + deviceTimeMs) : stopcopyBytes === 0 ? deviceTimeMs : MAX_REPORTED_MS;
    const limit = params['downtime-limit'];

    // Stall: remaining has not shrunk for stall-iterations passes.
    let stalledNow = false;
    if (remainingBytes < this.#bestRemaining * 0.98) {
      this.#bestRemaining = remainingBytes;
      this.#sinceProgress = 0;
      this.stalled = false;
    } else if (++this.#sinceProgress >= params['stall-iterations'] && expectedDowntimeMs > limit) {
      if (!this.stalled) stalledNow = true;
      this.stalled = true;
    }
    // The smallest limit that converges now: what a switchover would cost now, plus a margin.
    this.suggestedDowntimeLimitMs = this.stalled && expectedDowntimeMs < MAX_REPORTED_MS ? Math.ceil(expectedDowntimeMs * 1.15 + 10) : null;

    let switchover = false;
    let reason: string;
    if (input.switchoverAckRequired && !input.switchoverAcked) reason = 'waiting for the switchover ACK';
    else if (known && expectedDowntimeMs <= limit) {
      switchover = true;
      reason = `expected downtime ${expectedDowntimeMs.toFixed(0)} ms fits downtime-limit ${limit} ms`;
    } else if (!known && precopyBytes === 0) {
      // Nothing can be sent before the stop, so nothing can be measured or gained by waiting.
      switchover = true;
      reason = 'no precopy data and no bandwidth measurement: switching over';
    } else reason = `expected downtime ${expectedDowntimeMs.toFixed(0)} ms exceeds downtime-limit ${limit} ms`;

    const iterationBudgetBytes = Math.max(8 << 20, Math.floor(bandwidth * 0.5));
    return {
      switchover,
      reason,
      expectedDowntimeMs,
      deviceTimeMs,
      remainingBytes,
      stopcopyBytes,
      precopyBytes,
      bandwidthBytesPerSec: bandwidth,
      stalledNow,
      suggestedDowntimeLimitMs: this.suggestedDowntimeLimitMs,
      iterationBudgetBytes,
      idleWaitMs: 10,
    };
  }
}
