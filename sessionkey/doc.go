// Package sessionkey will implement fkx1, fleetkey's session-key protocol:
// a signed ECDH handshake between device and gateway, per-direction traffic
// keys with a generation ratchet, the envelope and its replay window. The
// byte-level specification is ../shared/FKX1.md (kept as SPEC.md here once
// the code lands).
//
// Nothing is implemented yet (issue 5); the package exists so the
// workspace has its final shape.
package sessionkey
