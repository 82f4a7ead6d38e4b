// The VM's run state comes from the embedder through two hooks.
export interface VmControl {
  /** Stops the vCPUs (and anything else that dirties memory). */
  stop(): Promise<void>;
  /** Resumes the vCPUs. */
  resume(): Promise<void>;
  readonly running: boolean;
}

/** A stand-in VM for the demo and tests: a flag the RAM handler consults. */
export class SyntheticVm implements VmControl {
  running: boolean;
  stops = 0;
  resumes = 0;

  constructor(running = true) {
    this.running = running;
  }

  async stop(): Promise<void> {
    this.running = false;
    this.stops++;
  }

  async resume(): Promise<void> {
    this.running = true;
    this.resumes++;
  }
}
