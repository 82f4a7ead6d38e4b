// A tiny schema layer for the peer's JSON: each schema checks an unknown
// value and returns it typed, or throws ERR_MIGRATION_PROTOCOL naming the
// field ("Hello.parameters.downtime-limit: expected a number, got "x"").
//
// Hand-written rather than valibot: a library a VMM embeds should not pull a
// runtime dependency for ~150 lines, the messages must name fields our way,
// and every schema here is bounded (string and array lengths), which is what
// keeps a hostile 1 MiB payload from costing more than its parse. The
// message types are inferred from the schemas (Infer), so the two cannot
// drift apart.
import { MigrationError } from '../errors.js';

export interface Schema<T> {
  /** What the value must be, for error messages ("a number"). */
  readonly expected: string;
  /** The value, typed, or ERR_MIGRATION_PROTOCOL naming `path`. */
  parse(value: unknown, path: string): T;
}

export type Infer<S> = S extends Schema<infer T> ? T : never;

export function protocolError(path: string, message: string): MigrationError {
  return new MigrationError('ERR_MIGRATION_PROTOCOL', `${path}: ${message}`);
}

/** A short, bounded rendering of what was found instead. */
function shown(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object') return 'an object';
  const s = typeof value === 'string' ? JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value) : String(value);
  return `${typeof value} ${s}`;
}

function fail(path: string, expected: string, value: unknown): never {
  throw protocolError(path, `expected ${expected}, got ${shown(value)}`);
}

export function number(options: { min?: number; max?: number; integer?: boolean } = {}): Schema<number> {
  const { min = -Number.MAX_VALUE, max = Number.MAX_VALUE, integer = false } = options;
  const range = min === -Number.MAX_VALUE && max === Number.MAX_VALUE ? '' : ` from ${min} to ${max}`;
  const expected = `${integer ? 'an integer' : 'a number'}${range}`;
  return {
    expected,
    parse(v, path) {
      if (typeof v !== 'number' || !Number.isFinite(v)) fail(path, integer ? 'an integer' : 'a number', v);
      if ((integer && !Number.isInteger(v)) || v < min || v > max) fail(path, expected, v);
      return v;
    },
  };
}

export function string(options: { minLength?: number; maxLength: number }): Schema<string> {
  const { minLength = 0, maxLength } = options;
  const expected = `a string of ${minLength}-${maxLength} characters`;
  return {
    expected,
    parse(v, path) {
      if (typeof v !== 'string') fail(path, 'a string', v);
      if (v.length < minLength || v.length > maxLength) fail(path, expected, v);
      return v;
    },
  };
}

export function boolean(): Schema<boolean> {
  return {
    expected: 'true or false',
    parse(v, path) {
      if (typeof v !== 'boolean') fail(path, 'true or false', v);
      return v;
    },
  };
}

export function oneOf<const T extends readonly string[]>(values: T): Schema<T[number]> {
  const expected = `one of ${values.map((x) => JSON.stringify(x)).join(', ')}`;
  return {
    expected,
    parse(v, path) {
      if (typeof v !== 'string' || !values.includes(v)) fail(path, expected, v);
      return v as T[number];
    },
  };
}

export function nullable<T>(inner: Schema<T>): Schema<T | null> {
  return {
    expected: `${inner.expected} or null`,
    parse: (v, path) => (v === null ? null : inner.parse(v, path)),
  };
}

export function array<T>(item: Schema<T>, options: { maxLength: number }): Schema<T[]> {
  return {
    expected: `an array of at most ${options.maxLength}`,
    parse(v, path) {
      if (!Array.isArray(v)) fail(path, 'an array', v);
      if (v.length > options.maxLength) throw protocolError(path, `expected at most ${options.maxLength} entries, got ${v.length}`);
      return v.map((x, i) => item.parse(x, `${path}[${i}]`));
    },
  };
}

/** A field that may be absent (undefined); present, it must match. */
export interface Optional<T> extends Schema<T | undefined> {
  readonly optional: true;
}
export function optional<T>(inner: Schema<T>): Optional<T> {
  return { optional: true, expected: inner.expected, parse: (v, path) => (v === undefined ? undefined : inner.parse(v, path)) };
}

type Shape = Record<string, Schema<unknown>>;
type OptionalKeys<S extends Shape> = { [K in keyof S]: S[K] extends Optional<unknown> ? K : never }[keyof S];
export type ObjectOf<S extends Shape> = { -readonly [K in Exclude<keyof S, OptionalKeys<S>>]: Infer<S[K]> } & { -readonly [K in OptionalKeys<S>]?: Infer<S[K]> };

/**
 * A plain object with exactly these fields (optional ones may be absent); an
 * unknown field is an error too: both ends speak the same wire version, so a
 * field this side does not know is a bug or an attack, not an extension.
 */
export function object<S extends Shape>(shape: S): Schema<ObjectOf<S>> {
  const keys = Object.keys(shape);
  return {
    expected: 'an object',
    parse(v, path) {
      if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(path, 'an object', v);
      const out: Record<string, unknown> = {};
      for (const k of keys) {
        const value = shape[k]!.parse(Object.hasOwn(v, k) ? (v as Record<string, unknown>)[k] : undefined, `${path}.${k}`);
        if (value !== undefined) out[k] = value;
      }
      for (const k of Object.keys(v)) if (!Object.hasOwn(shape, k)) throw protocolError(`${path}.${k.length > 40 ? `${k.slice(0, 40)}...` : k}`, 'unknown field');
      return out as ObjectOf<S>;
    },
  };
}

/** `inner`, then a check of the whole value (`check` returns a problem, or null). */
export function refine<T>(inner: Schema<T>, check: (value: T) => string | null): Schema<T> {
  return {
    expected: inner.expected,
    parse(v, path) {
      const value = inner.parse(v, path);
      const problem = check(value);
      if (problem !== null) throw protocolError(path, problem);
      return value;
    },
  };
}
