// The convergence policy: when to switch over, and the downtime to expect.
// Downtime is not only bytes over bandwidth: devices spend time on their
// transitions and on loading. The device-aware policy learns those times from
// what this migration has observed (arcs on both sides, the destination's
// load rate) and adds them to the estimate. The classic policy reproduces
// QEMU's: stop-copy bytes over bandwidth, nothing else.
import { type ArcEstimate, type EstimateBasis, type PendingBytes, type ResolvedArc, type StateHandler, type SwitchoverStep, stepSide } from './handler.js';
import type { MigrationParameters } from './params.js';
import { MAX_REPORTED_MS, saneMs, subtractBytes, sumBytes, transferMs } from './accounting.js';
import { deviceSetKey, learnedControlMs } from './switchover-history.js';

export type PolicyKind = 'device-aware' | 'classic';

export interface PolicyInputs {
  pending: PendingBytes[];
  measuredBandwidthBytesPerSec: number;
  /** Which meter measuredBandwidthBytesPerSec comes from: data arriving at the destination, or data sent. */
  bandwidthMeter?: 'arriving' | 'sent';
  /** How much sending the measured bandwidth rests on, ms (see MIN_RATE_EVIDENCE_MS). */
  bandwidthCoveredMs?: number;
  params: MigrationParameters;
  switchoverAckRequired: boolean;
  switchoverAcked: boolean;
  iteration: number;
  /** Sent but not yet reported arrived: stop-copy data will queue behind it on the link. */
  inTransitBytes?: number;
  /** Age of the destination's report inTransitBytes rests on, ms: it went on receiving since. */
  inTransitReportAgeMs?: number;
  /** Arrived but not yet loaded: stop-copy data will queue behind it at the devices. */
  awaitingLoadBytes?: number;
  /** performance.now() of this pass (stall reports are rate-limited in time). */
  nowMs?: number;
}

export interface DeviceEstimate {
  sourceArcsMs: number;
  destinationArcsMs: number;
  /** Destination load time of this device's stop-copy data beyond what overlaps the transfer. */
  loadMs: number;
  /** Every arc counted, with the assumption applied where nothing was seen. */
  arcs: ResolvedArc[];
}

/**
 * The expected downtime in parts, each saying what it rests on. The parts add
 * up to the expected downtime: arcs on the slowest device's path at each
 * side, data at the switchover bandwidth, load beyond the transfer, overhead.
 */
export interface DowntimeSplit {
  dataMs: number;
  /** What the data part moves: stop-copy data, what is still on its way, what devices dirty during the arcs. */
  dataBytes: number;
  /** Of dataBytes, sent before the stop and expected still on its way once the source arcs are walked. */
  inTransitBytes: number;
  /** Where the switchover bandwidth comes from. */
  dataBasis: 'measured' | 'configured' | 'unknown';
  /** The switchover bandwidth the data part rests on, bytes/s (0: unknown), and for a measured one, its meter. */
  bandwidthBytesPerSec: number;
  bandwidthMeter: 'arriving' | 'sent' | null;
  sourceArcsMs: number;
  destinationArcsMs: number;
  /** Of the counted arcs (source and destination critical paths), ms by basis. */
  arcsByBasis: Partial<Record<EstimateBasis, number>>;
  loadMs: number;
  overheadMs: number;
  /** The control exchanges' cost: learned from the last migration of these devices, or assumed. */
  overheadBasis: 'learned' | 'assumed';
  /** Arcs counted at an assumed time (never measured, probed or learned). */
  unmeasured: ResolvedArc[];
  /** One line for people: `expected 480 ms: data 120 (measured), arcs 350 (probed), load 10; unmeasured: none`. */
  summary: string;
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
  split: DowntimeSplit;
  /** The downtime limit this decision aimed for (downtime-limit, or higher while the dynamic limit ramps). */
  limitInForceMs: number;
  /** Set when the dynamic limit was raised by this pass. */
  limitRaisedTo: number | null;
}

/**
 * The parameter whose assumption an arc of this step gets when nothing was
 * seen of it: the P2P quiesce is the slow kind (hundreds of ms under load).
 */
export function assumptionParameter(step: SwitchoverStep): 'x-assumed-p2p-arc-ms' | 'x-assumed-arc-ms' {
  return step === 'quiesce' ? 'x-assumed-p2p-arc-ms' : 'x-assumed-arc-ms';
}

function resolveArcs(device: string, arcs: ArcEstimate[], params: MigrationParameters): ResolvedArc[] {
  return arcs.map((a) => ({ device, side: stepSide(a.step), arc: a.arc, step: a.step, basis: a.basis, ms: saneMs(a.ms ?? params[assumptionParameter(a.step)]) }));
}

function sumMs(arcs: ResolvedArc[]): number {
  return saneMs(arcs.reduce((t, a) => t + a.ms, 0));
}

/** "probed 350" or "probed 340 + assumed 10". */
export function describeBasis(byBasis: Partial<Record<EstimateBasis, number>>): string {
  const parts = (Object.entries(byBasis) as [EstimateBasis, number][]).filter(([, ms]) => ms > 0);
  if (parts.length === 0) return 'none';
  if (parts.length === 1) return parts[0]![0];
  return parts.map(([b, ms]) => `${b} ${ms.toFixed(0)}`).join(' + ');
}

/** While stalled, the stall is reported again at most this often. */
const STALL_REPORT_INTERVAL_MS = 5000;
/** Steps of the dynamic limit from downtime-limit to its ceiling. */
const LIMIT_RAMP_STEPS = 4;

/** A pass with little to send waits out this window (QEMU's iterations run on 100 ms windows). */
const PACE_WINDOW_MS = 100;

/**
 * A measured rate is not extrapolated far past what it was measured on: the
 * switchover waits until the rate rests on at least as much sending as the
 * data part it predicts, up to this. After one 27 ms pass of 9 MiB the
 * arrival rate read 525 MiB/s, and the switchover then moved 112 MiB at
 * 330; one more pass measured the rate on 300 ms and left 3 MiB to send.
 */
export const MIN_RATE_EVIDENCE_MS = 250;

/**
 * Fixed cost of a switchover beyond devices and data (the control exchanges
 * and their hops) until a migration of the same devices measured it: then
 * the learned figure (switchover-history.ts). 10-25 ms on a busy 2-core host.
 */
const ASSUMED_CONTROL_MS = 3;

export class DowntimePolicy {
  readonly handlers: StateHandler[];
  readonly kind: PolicyKind;
  /** Destination-reported resume arcs, per section. */
  readonly destinationArcs = new Map<number, ArcEstimate[]>();
  /** Destination-reported load cost, ms per MiB, per section. */
  readonly loadMsPerMiB = new Map<number, number>();
  stalled = false;
  suggestedDowntimeLimitMs: number | null = null;
  last: PolicyDecision | null = null;
  #bestRemaining = Infinity;
  #sinceProgress = 0;
  #stallReportedAt = -Infinity;
  /** The dynamic limit reached so far (0: not ramped). */
  #rampedLimitMs = 0;

  /** The downtime limit in force: downtime-limit, or the dynamic limit once it ramped above it (never above its ceiling). */
  limitInForceMs(params: MigrationParameters): number {
    const ceiling = params['x-downtime-limit-ceiling'];
    const ramped = ceiling > 0 ? Math.min(this.#rampedLimitMs, ceiling) : 0;
    return Math.max(params['downtime-limit'], ramped);
  }

  constructor(handlers: StateHandler[], kind: PolicyKind = 'device-aware') {
    this.handlers = handlers;
    this.kind = kind;
    this.deviceSetKey = deviceSetKey(handlers.map((h) => h.describe().compat));
  }

  /** Which learned control cost applies: these devices, in order. */
  readonly deviceSetKey: string;

  /** The destination's own view of its resume arcs (it knows what it measured and learned). */
  recordDestinationArcs(section: number, arcs: ArcEstimate[]): void {
    this.destinationArcs.set(section, arcs);
  }

  recordLoadRate(section: number, msPerMiB: number): void {
    if (Number.isFinite(msPerMiB) && msPerMiB >= 0) this.loadMsPerMiB.set(section, saneMs(msPerMiB));
  }

  /** Per device: arcs on both sides, and the load of its stop-copy data (evaluate() keeps what outlasts the transfer). */
  deviceEstimates(pending: PendingBytes[], params: MigrationParameters): (DeviceEstimate | null)[] {
    return this.handlers.map((h, i) => {
      if (!h.switchoverArcs) return null;
      const id = h.describe().id;
      const bytes = pending[i]?.stopcopyBytes ?? 0;
      const rate = this.loadMsPerMiB.get(i);
      const load = rate === undefined ? 0 : saneMs((bytes / (1 << 20)) * rate);
      // The destination reports its resume arcs and, when it probed its idle
      // device (same model), the source-path arcs it walked: those fill in
      // what this side could not measure (pre-copy-p2p -> stop-copy).
      const reported = this.destinationArcs.get(i);
      const walkedThere = new Map((reported ?? []).filter((a) => stepSide(a.step) === 'source' && a.ms !== null && a.basis !== 'assumed').map((a) => [a.arc, a.ms!]));
      const sourceArcs = h.switchoverArcs().map((a): ArcEstimate => (a.basis === 'assumed' && walkedThere.has(a.arc) ? { ...a, ms: walkedThere.get(a.arc)!, basis: 'probed' } : a));
      const source = resolveArcs(id, sourceArcs, params);
      // Until the destination reports its arcs, what this side knows of them (same model).
      const destination = resolveArcs(id, reported?.filter((a) => stepSide(a.step) === 'destination') ?? h.resumeArcs?.() ?? [], params);
      return {
        sourceArcsMs: sumMs(source),
        destinationArcsMs: sumMs(destination),
        loadMs: load,
        arcs: [...source, ...destination],
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
    const devices = this.kind === 'classic' ? this.handlers.map(() => null) : this.deviceEstimates(input.pending, params);
    // Source arcs, then the data (with any load that outlasts it), then the
    // destination's arcs; each phase waits for the slowest device.
    // The switchover runs in steps that every device finishes before the next
    // starts (all quiesce P2P, then all stop; at the destination all leave
    // resuming, then all reach running-p2p, then running): each step costs
    // its slowest device, and the steps add up.
    const critical = new Map<SwitchoverStep, { ms: number; arcs: ResolvedArc[] }>();
    let extraLoad = 0;
    const unmeasured: ResolvedArc[] = [];
    for (const d of devices) {
      if (!d) continue;
      const steps = new Map<SwitchoverStep, ResolvedArc[]>();
      for (const a of d.arcs) steps.set(a.step, [...(steps.get(a.step) ?? []), a]);
      for (const [key, arcs] of steps) {
        const ms = sumMs(arcs);
        if (ms >= (critical.get(key)?.ms ?? 0)) critical.set(key, { ms, arcs });
      }
      unmeasured.push(...d.arcs.filter((a) => a.basis === 'assumed'));
    }
    // A device keeps running, and dirtying its state, from the VM's stop
    // until it is in stop-copy: through the slowest device's quiesce, then
    // its own stop arc. What it dirties then is stop-copy data too.
    const quiesceMs = critical.get('quiesce')?.ms ?? 0;
    const dirtiedBytes = classic
      ? 0
      : sumBytes(
          this.handlers.map((h, i) => {
            const d = devices[i];
            const rate = h.dirtyBytesPerSec?.() ?? null;
            if (!d || rate === null || !(rate > 0)) return 0;
            const ownStopMs = sumMs(d.arcs.filter((a) => a.step === 'stop'));
            return Math.floor((rate * (quiesceMs + ownStopMs)) / 1000);
          }),
        );
    let srcArcs = 0;
    let dstArcs = 0;
    const arcsByBasis: Partial<Record<EstimateBasis, number>> = {};
    for (const [key, step] of critical) {
      if (stepSide(key) === 'source') srcArcs = saneMs(srcArcs + step.ms);
      else dstArcs = saneMs(dstArcs + step.ms);
      for (const a of step.arcs) arcsByBasis[a.basis] = (arcsByBasis[a.basis] ?? 0) + a.ms;
    }
    // Data in transit: the report it rests on is up to a report interval old,
    // and the destination went on receiving since (at most at the path's rate).
    // What is still on its way then drains while the source walks its arcs:
    // only what outlasts them delays the stop-copy data. Counted whole, a
    // 4 MiB unix-socket backlog read as 9 ms of a 21 ms downtime it did not cost.
    const reportedInTransit = classic ? 0 : (input.inTransitBytes ?? 0);
    const arrivedSinceReport = known ? Math.floor((bandwidth * Math.max(0, input.inTransitReportAgeMs ?? 0)) / 1000) : 0;
    const inTransit = subtractBytes(reportedInTransit, arrivedSinceReport);
    const inTransitLeftBytes = known ? subtractBytes(inTransit, Math.floor((bandwidth * srcArcs) / 1000)) : inTransit;
    const xferBytes = sumBytes([stopcopyBytes, inTransitLeftBytes, dirtiedBytes]);
    const xferMs = known ? transferMs(xferBytes, bandwidth) : xferBytes === 0 ? 0 : MAX_REPORTED_MS;
    // Data already at the destination but not yet loaded, at the slowest device load rate seen.
    const loadRate = Math.max(0, ...this.loadMsPerMiB.values());
    const backlogMs = classic ? 0 : saneMs(((input.awaitingLoadBytes ?? 0) / (1 << 20)) * loadRate);
    // The destination loads as data arrives, devices in parallel: first the
    // backlog, which it works through while the source quiesces and stops its
    // devices, then each device's stop-copy data, which arrives during the
    // transfer. What outlasts the transfer is the load part.
    const backlogLeftMs = Math.max(0, backlogMs - srcArcs);
    extraLoad = Math.max(0, backlogLeftMs - xferMs);
    for (const d of devices) {
      if (!d) continue;
      d.loadMs = saneMs(Math.max(0, backlogLeftMs + d.loadMs - xferMs));
      extraLoad = Math.max(extraLoad, d.loadMs);
    }
    const learnedControl = classic ? undefined : learnedControlMs(this.deviceSetKey);
    const overheadMs = classic ? 0 : (learnedControl ?? ASSUMED_CONTROL_MS);
    const overheadBasis: DowntimeSplit['overheadBasis'] = learnedControl === undefined ? 'assumed' : 'learned';
    const deviceTimeMs = classic ? 0 : saneMs(srcArcs + dstArcs + extraLoad + overheadMs);
    const estimateMs = saneMs(xferMs + deviceTimeMs);
    const expectedDowntimeMs = known || xferBytes === 0 ? estimateMs : null;
    const dataBasis: DowntimeSplit['dataBasis'] = params['avail-switchover-bandwidth'] > 0 ? 'configured' : known ? 'measured' : xferBytes === 0 ? 'measured' : 'unknown';
    const loadMs = classic ? 0 : saneMs(extraLoad);
    const fmt = (v: number) => v.toFixed(0);
    const mib = (bytes: number) => (bytes / (1 << 20)).toFixed(1);
    const split: DowntimeSplit = {
      dataMs: xferMs,
      dataBytes: xferBytes,
      inTransitBytes: inTransitLeftBytes,
      dataBasis,
      bandwidthBytesPerSec: known ? bandwidth : 0,
      bandwidthMeter: dataBasis === 'measured' && known ? (input.bandwidthMeter ?? null) : null,
      sourceArcsMs: srcArcs,
      destinationArcsMs: dstArcs,
      arcsByBasis,
      loadMs,
      overheadMs,
      overheadBasis,
      unmeasured,
      summary: classic
        ? `expected ${expectedDowntimeMs === null ? 'unknown' : fmt(estimateMs)} ms: data ${fmt(xferMs)} (${dataBasis}); classic policy: device time not counted`
        : `expected ${expectedDowntimeMs === null ? 'unknown' : fmt(estimateMs)} ms: data ${fmt(xferMs)} (${xferBytes > 0 ? `${mib(xferBytes)} MiB${inTransitLeftBytes > 0 ? `, ${mib(inTransitLeftBytes)} in transit` : ''}, ` : ''}${dataBasis}${known && xferBytes > 0 ? ` at ${fmt(bandwidth / (1 << 20))} MiB/s${dataBasis === 'measured' && input.bandwidthMeter ? ` ${input.bandwidthMeter}` : ''}` : ''}${dirtiedBytes > 0 ? `; ${mib(dirtiedBytes)} MiB dirtied during the arcs` : ''}), arcs ${fmt(srcArcs + dstArcs)} (${describeBasis(arcsByBasis)}), load ${fmt(loadMs)}, overhead ${fmt(overheadMs)} (${overheadBasis}); unmeasured: ${
            unmeasured.length ? unmeasured.map((a) => `${a.device} ${a.arc} (${a.side}, assumed ${fmt(a.ms)} ms)`).join(', ') : 'none'
          }`,
    };
    const limit = this.limitInForceMs(params);
    const now = input.nowMs ?? performance.now();

    // Stall: remaining has not shrunk for stall-iterations passes while the estimate misses the limit.
    let stalledNow = false;
    if (remainingBytes < this.#bestRemaining * 0.98) {
      this.#bestRemaining = remainingBytes;
      this.#sinceProgress = 0;
      this.stalled = false;
    } else if (++this.#sinceProgress >= params['stall-iterations'] && known && estimateMs > limit) {
      // Reported when it starts and again while it lasts (rate-limited), so a
      // management app that missed the first report still learns of it.
      // A stall that flaps (remaining dips, then grows back) is one stall: reports stay rate-limited.
      if (now - this.#stallReportedAt >= STALL_REPORT_INTERVAL_MS) stalledNow = true;
      this.stalled = true;
    }
    if (this.stalled && estimateMs <= limit) this.stalled = false;
    if (stalledNow) this.#stallReportedAt = now;
    // The dynamic limit: each stall period raises the limit in force one step toward the ceiling.
    let limitRaisedTo: number | null = null;
    const ceiling = params['x-downtime-limit-ceiling'];
    if (stalledNow && ceiling > limit) {
      const step = Math.max(1, (ceiling - params['downtime-limit']) / LIMIT_RAMP_STEPS);
      this.#rampedLimitMs = Math.min(ceiling, Math.ceil(limit + step));
      limitRaisedTo = this.#rampedLimitMs;
      this.#sinceProgress = 0;
    }
    // The smallest limit that converges now: what a switchover would cost now, plus a margin for noise.
    this.suggestedDowntimeLimitMs = this.stalled && estimateMs < MAX_REPORTED_MS ? Math.ceil(estimateMs * 1.15 + 10) : null;

    let switchover = false;
    let reason: string;
    const coveredMs = input.bandwidthCoveredMs;
    const rateUnproven = !classic && dataBasis === 'measured' && coveredMs !== undefined && coveredMs < Math.min(xferMs, MIN_RATE_EVIDENCE_MS);
    if (input.switchoverAckRequired && !input.switchoverAcked) reason = 'waiting for the switchover ACK';
    else if (known && estimateMs <= limit && rateUnproven) reason = `the rate rests on ${coveredMs!.toFixed(0)} ms of sending, the data part would take ${xferMs.toFixed(0)} ms: measuring further`;
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
      idleWaitMs: PACE_WINDOW_MS,
      devices,
      split,
      limitInForceMs: limit,
      limitRaisedTo,
    };
    this.last = decision;
    return decision;
  }
}
