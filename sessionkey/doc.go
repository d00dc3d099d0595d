// Package sessionkey implements fkx1, fleetkey's session-key protocol: a
// signed ECDH handshake between device and gateway, per-direction traffic
// keys with a generation ratchet, the envelope and its replay window. The
// byte-level specification is ../shared/FKX1.md.
//
// What is here: the key schedule below the master secret (HKDF labels,
// TS[x,g], key and iv per generation); the envelope with its sender
// (generation jumps, the 4-generation and 2^32 limits) and its receiver
// (1024-message window, forward derivation, commit only on a verified
// tag, marks deferred until the record is durable, wiping of spent
// secrets); credentials, signatures through crypto.Signer, the transcript
// and key derivation, the message codecs, and the key exchange of suites 1
// and 2; the initiator and responder state machines (no I/O: bytes in,
// bytes out); and the keyring of each side (at most 3 live kids, cut-over,
// retirement, the time ratchet, the epoch policy). Known-answer vectors
// are in testdata/vectors.json. Where the code decided what the spec
// leaves open, SPEC.md says so at its top.
package sessionkey
