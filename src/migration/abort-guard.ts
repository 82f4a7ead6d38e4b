// One migration's abort guard, one per side: the first failure wins, aborts
// the signal that the phases and the handlers (ctx.signal) wait on, and runs
// the side's teardown; the switchover bound runs on this host's monotonic
// clock (performance.now()), never on a clock of the peer's.

export class AbortGuard {
  readonly #ac = new AbortController();
  readonly #teardown: (err: Error) => void;
  #failure: Error | null = null;
  #bound: NodeJS.Timeout | null = null;

  /** `teardown`: what this side does at once on its first failure (close sockets, reject waits). */
  constructor(teardown: (err: Error) => void) {
    this.#teardown = teardown;
  }

  /** The first failure, or null while the migration goes on. */
  get failure(): Error | null {
    return this.#failure;
  }

  /** Aborted with the first failure. */
  get signal(): AbortSignal {
    return this.#ac.signal;
  }

  /** The first failure wins; later ones change nothing. */
  fail(err: Error): void {
    if (this.#failure) return;
    this.#failure = err;
    this.#ac.abort(err);
    this.#teardown(err);
  }

  /**
   * Waits for a phase's parallel hooks. The first to fail fails the
   * migration at once, so that the others' pending work aborts through the
   * signal; its error is thrown once every hook has settled (a rollback never
   * races a hook still running).
   */
  async settle<T>(promises: (Promise<T> | T)[]): Promise<T[]> {
    const results = await Promise.allSettled(
      promises.map((p) =>
        Promise.resolve(p).catch((err: unknown) => {
          this.fail(err instanceof Error ? err : new Error(String(err)));
          throw err;
        }),
      ),
    );
    const failed = results.find((r) => r.status === 'rejected');
    if (failed) throw (failed as PromiseRejectedResult).reason;
    return results.map((r) => (r as PromiseFulfilledResult<T>).value);
  }

  /** Throws the failure, if any: a phase calls it between steps. */
  check(): void {
    if (this.#failure) throw this.#failure;
  }

  /**
   * Calls `expired(measuredMs)` once `boundMs` have passed since `sinceMs`
   * (a performance.now() of this host), unless disarmed first. `expired`
   * decides what to say and fails the migration. boundMs <= 0: no bound.
   */
  armBound(sinceMs: number, boundMs: number, expired: (measuredMs: number) => void): void {
    this.disarm();
    if (!(boundMs > 0)) return;
    this.#bound = setTimeout(() => {
      this.#bound = null;
      expired(performance.now() - sinceMs);
    }, Math.max(0, sinceMs + boundMs - performance.now()));
  }

  /** The bound no longer applies (the peer took over, or the phase ended). */
  disarm(): void {
    if (this.#bound) clearTimeout(this.#bound);
    this.#bound = null;
  }
}
