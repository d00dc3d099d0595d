// Package sessionkey implements fkx1, fleetkey's session-key protocol: a
// signed ECDH handshake between device and gateway, per-direction traffic
// keys with a generation ratchet, the envelope and its replay window. The
// byte-level specification is ../shared/FKX1.md.
//
// Built so far (issue 5, first step): the key schedule below the master
// secret (HKDF labels, TS[x,g], key and iv per generation), the envelope
// with its sender (generation jumps, the 4-generation and 2^32 limits) and
// its receiver (1024-message window, forward derivation of at most 4
// generations, commit only on a verified tag, wiping of spent secrets), and
// credentials (chain and reference, with their limits), signatures through
// crypto.Signer, and the transcript and key derivation (TH1 to TH4, PRK,
// finish values, MS, kid), the message codecs (msg1 to msg3, hint), and the
// key exchange of suite 1 (X25519) and suite 2 (X25519MLKEM768).
// Not yet: the initiator and responder state machines,
// and the known-answer vectors.
package sessionkey
