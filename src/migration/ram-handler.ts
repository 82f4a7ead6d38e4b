// Synthetic guest RAM: pages that a running VM re-dirties at a given rate,
// so demos and tests see realistic convergence. Pages carry versions; the
// destination verifies every page and a digest proves it holds exactly the
// source's memory at stop time.
import type { HandlerContext, PendingBytes, SectionDescription, SectionOutput, StateHandler } from './handler.js';
import type { VmControl } from './vm.js';
import { MigrationError } from './errors.js';

export interface RamOptions {
  id?: string;
  sizeBytes: number;
  pageBytes?: number;
  /** How fast the running VM dirties memory. */
  dirtyBytesPerSec?: number;
  /** The part of memory the VM keeps writing to (default: all of it). */
  workingSetBytes?: number;
  seed?: number;
  vm: VmControl;
}

const RECORD_HEADER_BYTES = 8; // u32 page, u32 version
const BATCH_BYTES = 1 << 20;

function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x7feb352d);
  x = Math.imul(x ^ (x >>> 15), 0x846ca68b);
  return (x ^ (x >>> 16)) >>> 0;
}

export class RamHandler implements StateHandler {
  readonly id: string;
  readonly sizeBytes: number;
  readonly pageBytes: number;
  #pages: number;
  #seed: number;
  #versions: Uint32Array;
  #dirty: Uint8Array;
  #dirtyCount = 0;
  #cursor = 0;
  #rate: number;
  #workingSetPages: number;
  #vm: VmControl;
  #lastTick = performance.now();
  #carry = 0;
  #rng: number;
  #savedDigest?: string;
  #loadedDigest?: string;
  #loadSeed: number | null = null;
  transferredBytes = 0;

  constructor(options: RamOptions) {
    const pageBytes = options.pageBytes ?? 4096;
    if (!Number.isInteger(pageBytes) || pageBytes < 64 || pageBytes > 1 << 20 || pageBytes % 8 !== 0) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', `RAM page size must be a multiple of 8 between 64 and 1MiB, got ${pageBytes}`);
    if (!Number.isInteger(options.sizeBytes) || options.sizeBytes < pageBytes || options.sizeBytes % pageBytes !== 0 || options.sizeBytes > 64 * 2 ** 30)
      throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', `RAM size must be a multiple of the page size (${pageBytes}) up to 64GiB, got ${options.sizeBytes}`);
    this.id = options.id ?? 'ram';
    this.sizeBytes = options.sizeBytes;
    this.pageBytes = pageBytes;
    this.#pages = options.sizeBytes / pageBytes;
    this.#seed = (options.seed ?? 1) >>> 0;
    this.#rng = mix32(this.#seed ^ 0x9e3779b9);
    this.#versions = new Uint32Array(this.#pages);
    this.#dirty = new Uint8Array(this.#pages);
    this.#rate = options.dirtyBytesPerSec ?? 0;
    if (!(this.#rate >= 0)) throw new MigrationError('ERR_MIGRATION_BAD_PARAMETER', 'RAM dirty rate must be >= 0');
    const ws = options.workingSetBytes ?? options.sizeBytes;
    this.#workingSetPages = Math.max(1, Math.min(this.#pages, Math.floor(ws / pageBytes)));
    this.#vm = options.vm;
  }

  describe(): SectionDescription {
    return { id: this.id, kind: 'ram', compat: `ram:${this.sizeBytes}:${this.pageBytes}` };
  }

  /** Applies the dirtying of the time since the last call, while the VM runs. */
  #advance(): void {
    const now = performance.now();
    const dt = (now - this.#lastTick) / 1000;
    this.#lastTick = now;
    if (!this.#vm.running || this.#rate <= 0) return;
    this.#carry = Math.min(this.#carry + (this.#rate * dt) / this.pageBytes, 4 * this.#workingSetPages);
    const n = Math.floor(this.#carry);
    this.#carry -= n;
    for (let i = 0; i < n; i++) {
      this.#rng = mix32(this.#rng + i);
      const page = this.#rng % this.#workingSetPages;
      this.#versions[page] = (this.#versions[page]! + 1) >>> 0;
      if (!this.#dirty[page]) {
        this.#dirty[page] = 1;
        this.#dirtyCount++;
      }
    }
  }

  #recordBytes(): number {
    return RECORD_HEADER_BYTES + this.pageBytes;
  }

  digestOf(seed: number, versions: Uint32Array): string {
    let h = mix32(seed ^ versions.length);
    for (let i = 0; i < versions.length; i++) h = mix32(h ^ versions[i]! ^ Math.imul(i, 0x9e3779b1));
    return h.toString(16).padStart(8, '0');
  }

  // ---- source ----
  async saveSetup(_ctx: HandlerContext): Promise<void> {
    this.#dirty.fill(1);
    this.#dirtyCount = this.#pages;
    this.#cursor = 0;
    this.#lastTick = performance.now();
  }

  async pending(_exact: boolean): Promise<PendingBytes> {
    this.#advance();
    const bytes = this.#dirtyCount * this.#recordBytes();
    return { precopyBytes: bytes, stopcopyBytes: bytes, exact: true };
  }

  #fillPage(buf: Buffer, at: number, page: number, version: number): void {
    buf.writeUInt32LE(page, at);
    buf.writeUInt32LE(version, at + 4);
    const word = mix32(this.#seed ^ mix32(page ^ mix32(version)));
    buf.writeUInt32LE(word, at + 8);
    buf.fill(word & 0xff, at + 12, at + RECORD_HEADER_BYTES + this.pageBytes);
  }

  async #sendDirty(budgetBytes: number, out: SectionOutput): Promise<number> {
    let sent = 0;
    const rec = this.#recordBytes();
    const perBatch = Math.max(1, Math.floor((BATCH_BYTES - 4) / rec));
    while (this.#dirtyCount > 0 && sent < budgetBytes) {
      const count = Math.min(perBatch, this.#dirtyCount);
      const buf = Buffer.allocUnsafe(4 + count * rec);
      buf.writeUInt32LE(this.#seed, 0);
      let at = 4;
      for (let i = 0; i < count; i++) {
        while (!this.#dirty[this.#cursor]) this.#cursor = this.#cursor + 1 === this.#pages ? 0 : this.#cursor + 1;
        const page = this.#cursor;
        this.#dirty[page] = 0;
        this.#dirtyCount--;
        this.#fillPage(buf, at, page, this.#versions[page]!);
        at += rec;
      }
      await out.send(buf);
      sent += buf.length;
      this.transferredBytes += buf.length;
      this.#advance();
    }
    return sent;
  }

  savePrecopy(budgetBytes: number, out: SectionOutput): Promise<number> {
    this.#advance();
    return this.#sendDirty(budgetBytes, out);
  }

  async saveStop(): Promise<void> {
    this.#advance(); // the dirtying up to the stop
  }

  async saveComplete(out: SectionOutput): Promise<number> {
    const sent = await this.#sendDirty(Number.MAX_SAFE_INTEGER, out);
    this.#savedDigest = this.digestOf(this.#seed, this.#versions);
    return sent;
  }

  async saveCleanup(): Promise<void> {
    this.#lastTick = performance.now();
  }

  // ---- destination ----
  async loadSetup(): Promise<void> {
    this.#versions.fill(0);
    this.#dirty.fill(0); // here: pages received at least once
    this.#dirtyCount = 0;
  }

  async load(parts: readonly Buffer[]): Promise<void> {
    const data = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    const rec = this.#recordBytes();
    if (data.length < 4 || (data.length - 4) % rec !== 0) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `RAM section: batch of ${data.length} bytes is not whole pages`);
    const seed = data.readUInt32LE(0);
    if (this.#loadSeed !== null && seed !== this.#loadSeed) throw new MigrationError('ERR_MIGRATION_PROTOCOL', 'RAM section: seed changed mid-stream');
    this.#loadSeed = seed;
    for (let at = 4; at < data.length; at += rec) {
      const page = data.readUInt32LE(at);
      const version = data.readUInt32LE(at + 4);
      const word = mix32(seed ^ mix32(page ^ mix32(version)));
      if (page >= this.#pages || data.readUInt32LE(at + 8) !== word) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `RAM section: page ${page} is corrupt`);
      const fill = word & 0xff;
      for (let i = at + 12; i < at + rec; i += 512) if (data[i] !== fill) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `RAM section: page ${page} is corrupt`);
      this.#versions[page] = version;
      if (!this.#dirty[page]) {
        this.#dirty[page] = 1;
        this.#dirtyCount++;
      }
    }
    this.transferredBytes += data.length;
  }

  async loadFinish(): Promise<void> {
    if (this.#dirtyCount !== this.#pages) throw new MigrationError('ERR_MIGRATION_PROTOCOL', `RAM section: only ${this.#dirtyCount} of ${this.#pages} pages arrived`);
    this.#loadedDigest = this.digestOf(this.#loadSeed ?? 0, this.#versions);
    this.#seed = this.#loadSeed ?? this.#seed;
  }


  digest(when: 'saved' | 'loaded' | 'now' = 'now'): string | undefined {
    if (when === 'saved') return this.#savedDigest;
    if (when === 'loaded') return this.#loadedDigest;
    return this.digestOf(this.#seed, this.#versions);
  }
}
