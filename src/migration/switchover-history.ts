// The switchover's fixed cost beyond arcs, data and load, learned per set of
// devices: the two control exchanges (end of stream -> ready, commit ->
// running), their event-loop hops and the destination's work in them besides
// its arcs. Nothing predicts it on a first contact (the policy assumes a few
// ms); each completed migration measures it, and the next migration of the
// same devices starts from it, as arcs start from the arc history.

/** Learned control cost, ms, per device set (the devices' compatibility keys in order). */
const controlMsByDevices = new Map<string, number>();

/** The key of a device set: its compatibility keys, in section order. */
export function deviceSetKey(compats: readonly string[]): string {
  return compats.join(' + ');
}

export function learnedControlMs(key: string): number | undefined {
  return controlMsByDevices.get(key);
}

/** Records a measured control cost; the learned figure is the mean of the last one and this (one noisy switchover moves it halfway). */
export function recordControlMs(key: string, ms: number): void {
  if (!Number.isFinite(ms) || ms < 0 || ms > MAX_CONTROL_MS) return;
  const previous = controlMsByDevices.get(key);
  controlMsByDevices.set(key, previous === undefined ? ms : (previous + ms) / 2);
}

/** A control cost above this is a glitch (a stopped process), not a cost to expect. */
const MAX_CONTROL_MS = 10_000;

export function exportSwitchoverHistory(): Record<string, number> {
  return Object.fromEntries(controlMsByDevices);
}

/** Takes what an earlier process saved; anything that is not a sane duration is ignored. */
export function importSwitchoverHistory(history: unknown): void {
  if (typeof history !== 'object' || history === null || Array.isArray(history)) return;
  for (const [key, ms] of Object.entries(history as Record<string, unknown>)) {
    if (typeof ms === 'number' && Number.isFinite(ms) && ms >= 0 && ms <= MAX_CONTROL_MS) controlMsByDevices.set(key, ms);
  }
}

/** Forgets every learned control cost of this process (a first contact, as on a fresh host). */
export function clearSwitchoverHistory(): void {
  controlMsByDevices.clear();
}
