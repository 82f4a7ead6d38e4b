// The convergence policy: when to switch over, and the downtime to expect.
// Downtime is not only bytes over bandwidth: devices spend time on their
// transitions and on loading. The device-aware policy learns those times from
// what this migration has observed (arcs on both sides, the destination's
// load rate) and adds them to the estimate. The classic policy reproduces
// QEMU's: stop-copy bytes over bandwidth, nothing else.
import type { PendingBytes, StateHandler } from './handler.js';
import type { MigrationParameters } from './params.js';
import { MAX_REPORTED_MS, saneMs, sumBytes, transferMs } from './accounting.js';

export type PolicyKind = 'device-aware' | 'classic';

export interface PolicyInputs {
  pending: PendingBytes[];
  measuredBandwidthBytesPerSec: number;
  params: MigrationParameters;
  switchoverAckRequired: boolean;
  switchoverAcked: boolean;
  iteration: number;
  /** Sent but not yet arrived: stop-copy data will queue behind it on the link. */
  inTransitBytes?: number;
  /** Arrived but not yet loaded: stop-copy data will queue behind it at the devices. */
  awaitingLoadBytes?: number;
}

export interface DeviceEstimate {
  sourceArcsMs: number;
  destinationArcsMs: number;
  /** Destination load time of this device's stop-copy data beyond what overlaps the transfer. */
  loadMs: number;
}

export interface PolicyDecision {
  switchover: boolean;
  reason: string;
  /** null while the bandwidth is unknown (nothing measured yet, no avail-switchover-bandwidth). */
  expectedDowntimeMs: number | null;
  /** Of which data-size-independent device time (arcs), ms. */
  deviceTimeMs: number;
  transferMs: number;
  remainingBytes: number;
  stopcopyBytes: number;
  precopyBytes: number;
  bandwidthBytesPerSec: number;
  stalledNow: boolean;
  suggestedDowntimeLimitMs: number | null;
  iterationBudgetBytes: number;
  idleWaitMs: number;
  devices: (DeviceEstimate | null)[];
}

/** Fixed cost of a switchover beyond devices and data: stopping the VM, the final round trip. */
const SWITCHOVER_OVERHEAD_MS = 3;

export class DowntimePolicy {
  readonly handlers: StateHandler[];
  readonly kind: PolicyKind;
  /** Destination-reported resume arc time, per section. */
  readonly destinationDeviceMs = new Map<number, number>();
  /** Destination-reported load cost, ms per MiB, per section. */
  readonly loadMsPerMiB = new Map<number, number>();
  stalled = false;
  suggestedDowntimeLimitMs: number | null = null;
  last: PolicyDecision | null = null;
  #bestRemaining = Infinity;
  #sinceProgress = 0;

  constructor(handlers: StateHandler[], kind: PolicyKind = 'device-aware') {
    this.handlers = handlers;
    this.kind = kind;
  }

  recordDestinationDeviceTime(section: number, ms: number): void {
    if (Number.isFinite(ms) && ms >= 0) this.destinationDeviceMs.set(section, saneMs(ms));
  }

  recordLoadRate(section: number, msPerMiB: number): void {
    if (Number.isFinite(msPerMiB) && msPerMiB >= 0) this.loadMsPerMiB.set(section, saneMs(msPerMiB));
  }

  /** Per device: arcs on both sides, and load beyond the transfer (devices run in parallel). */
  deviceEstimates(pending: PendingBytes[], transferMsTotal: number): (DeviceEstimate | null)[] {
    return this.handlers.map((h, i) => {
      if (!h.switchoverDeviceTimeMs) return null;
      const bytes = pending[i]?.stopcopyBytes ?? 0;
      const rate = this.loadMsPerMiB.get(i);
      const load = rate === undefined ? 0 : saneMs((bytes / (1 << 20)) * rate);
      return {
        sourceArcsMs: saneMs(h.switchoverDeviceTimeMs()),
        destinationArcsMs: this.destinationDeviceMs.get(i) ?? 0,
        loadMs: Math.max(0, load - transferMsTotal),
      };
    });
  }

  evaluate(input: PolicyInputs): PolicyDecision {
    const { params } = input;
    const stopcopyBytes = sumBytes(input.pending.map((p) => p.stopcopyBytes));
    const precopyBytes = sumBytes(input.pending.map((p) => p.precopyBytes));
    const remainingBytes = sumBytes(input.pending.map((p) => Math.max(p.precopyBytes, p.stopcopyBytes)));
    let bandwidth = params['avail-switchover-bandwidth'] > 0 ? params['avail-switchover-bandwidth'] : input.measuredBandwidthBytesPerSec;
    if (params['max-bandwidth'] > 0 && !(params['avail-switchover-bandwidth'] > 0)) bandwidth = bandwidth > 0 ? Math.min(bandwidth, params['max-bandwidth']) : params['max-bandwidth'];
    const known = bandwidth > 0;
    const classic = this.kind === 'classic';
    const xferBytes = sumBytes([stopcopyBytes, classic ? 0 : (input.inTransitBytes ?? 0)]);
    const xferMs = known ? transferMs(xferBytes, bandwidth) : xferBytes === 0 ? 0 : MAX_REPORTED_MS;
    const devices = this.kind === 'classic' ? this.handlers.map(() => null) : this.deviceEstimates(input.pending, xferMs);
    // Source arcs, then the data (with any load that outlasts it), then the
    // destination's arcs; each phase waits for the slowest device.
    let srcArcs = 0;
    let dstArcs = 0;
    let extraLoad = 0;
    for (const d of devices) {
      if (!d) continue;
      srcArcs = Math.max(srcArcs, d.sourceArcsMs);
      dstArcs = Math.max(dstArcs, d.destinationArcsMs);
      extraLoad = Math.max(extraLoad, d.loadMs);
    }
    // Data already at the destination but not yet loaded, at the slowest device load rate seen.
    const loadRate = Math.max(0, ...this.loadMsPerMiB.values());
    const backlogMs = classic ? 0 : saneMs(((input.awaitingLoadBytes ?? 0) / (1 << 20)) * loadRate);
    const deviceTimeMs = classic ? 0 : saneMs(srcArcs + dstArcs + extraLoad + backlogMs + SWITCHOVER_OVERHEAD_MS);
    const estimateMs = saneMs(xferMs + deviceTimeMs);
    const expectedDowntimeMs = known || xferBytes === 0 ? estimateMs : null;
    const limit = params['downtime-limit'];

    // Stall: remaining has not shrunk for stall-iterations passes while the estimate misses the limit.
    let stalledNow = false;
    if (remainingBytes < this.#bestRemaining * 0.98) {
      this.#bestRemaining = remainingBytes;
      this.#sinceProgress = 0;
      this.stalled = false;
    } else if (++this.#sinceProgress >= params['stall-iterations'] && known && estimateMs > limit) {
      if (!this.stalled) stalledNow = true;
      this.stalled = true;
    }
    if (this.stalled && estimateMs <= limit) this.stalled = false;
    // The smallest limit that converges now: what a switchover would cost now, plus a margin for noise.
    this.suggestedDowntimeLimitMs = this.stalled && estimateMs < MAX_REPORTED_MS ? Math.ceil(estimateMs * 1.15 + 10) : null;

    let switchover = false;
    let reason: string;
    if (input.switchoverAckRequired && !input.switchoverAcked) reason = 'waiting for the switchover ACK';
    else if (known && estimateMs <= limit) {
      switchover = true;
      reason = `expected downtime ${estimateMs.toFixed(0)} ms fits downtime-limit ${limit} ms`;
    } else if (!known && precopyBytes === 0) {
      // Nothing can be sent before the stop, so nothing can be measured or gained by waiting.
      switchover = true;
      reason = 'no precopy data and no bandwidth measurement: switching over';
    } else reason = known ? `expected downtime ${estimateMs.toFixed(0)} ms exceeds downtime-limit ${limit} ms` : 'measuring the bandwidth';

    const decision: PolicyDecision = {
      switchover,
      reason,
      expectedDowntimeMs,
      deviceTimeMs,
      transferMs: xferMs,
      remainingBytes,
      stopcopyBytes,
      precopyBytes,
      bandwidthBytesPerSec: bandwidth,
      stalledNow,
      suggestedDowntimeLimitMs: this.suggestedDowntimeLimitMs,
      iterationBudgetBytes: Math.max(8 << 20, Math.floor(bandwidth * 0.5)),
      idleWaitMs: 10,
      devices,
    };
    this.last = decision;
    return decision;
  }
}
