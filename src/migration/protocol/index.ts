// The protocol module: what goes over the wire and what it means.
// - frame.ts: the frame codec (header layout, checksums, wire version).
// - schema.ts: the small validation layer; messages.ts: every control
//   message's validator and (inferred) type.
// - end.ts: what each peer's frame means in each phase, for both sides.
// Stream I/O (FrameReader, FrameWriter, first-frame reads) is in ../wire.ts.
export * from './frame.js';
export * from './messages.js';
export * from './end.js';
