// Package identity parses, builds and checks fleetkey identities: device ids,
// trust domains, roles and the SPIFFE IDs that carry them in certificates.
//
// An id is embedded in MQTT topics (devices/{id}/up/...), so a '/', '+', '#'
// or '$' in an id would be a topic injection or an ACL bypass. The grammar is
// therefore a strict allowlist, ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$, checked by
// every part of the system wherever an id enters it. A SPIFFE ID has exactly
// the form spiffe://<trust-domain>/<role>/<name>, where name follows the id
// grammar; nothing else (query, fragment, port, userinfo, extra segments,
// percent-encoding) is accepted, so that there is exactly one spelling of
// each identity.
package identity

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// MaxIDLength is the longest device (or service, gateway, admin) name.
const MaxIDLength = 64

// MaxTrustDomainLength is the longest trust domain, as in the SPIFFE spec.
const MaxTrustDomainLength = 255

// Scheme is the URI scheme of every SPIFFE ID.
const Scheme = "spiffe"

// Role is what a certificate holder is in the fleet.
type Role string

// The roles of the identity profile. Authorization reads the role from the
// SPIFFE ID, never from the CN.
const (
	RoleDevice  Role = "device"
	RoleGateway Role = "gateway"
	RoleService Role = "service"
	RoleAdmin   Role = "admin"
)

// Roles lists every valid role, in a fixed order.
var Roles = []Role{RoleDevice, RoleGateway, RoleService, RoleAdmin}

// Valid reports whether r is one of Roles.
func (r Role) Valid() bool {
	switch r {
	case RoleDevice, RoleGateway, RoleService, RoleAdmin:
		return true
	}
	return false
}

// ParseRole returns the Role named s, or an error listing the valid roles.
func ParseRole(s string) (Role, error) {
	r := Role(s)
	if !r.Valid() {
		return "", fmt.Errorf("unknown role %q: want one of device, gateway, service, admin", s)
	}
	return r, nil
}

// ErrInvalid is wrapped by every error this package returns for bad input, so
// callers can tell a refused identity from other failures with errors.Is.
var ErrInvalid = errors.New("invalid identity")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// ValidateID checks a device id (or the name of a gateway, service or admin)
// against ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ and says which rule it breaks.
func ValidateID(id string) error {
	if id == "" {
		return invalid("empty id")
	}
	if len(id) > MaxIDLength {
		return invalid("id is %d bytes long; the limit is %d", len(id), MaxIDLength)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case isAlnum(c):
		case (c == '.' || c == '_' || c == '-') && i > 0:
		case c == '.' || c == '_' || c == '-':
			return invalid("id %q must start with a letter or digit", id)
		case c == '/' || c == '+' || c == '#' || c == '$':
			return invalid("id %q contains %q, which is an MQTT topic separator or wildcard", id, string(c))
		case c == 0:
			return invalid("id %q contains a NUL byte", id)
		case c >= 0x80:
			return invalid("id %q contains a non-ASCII byte at offset %d; only A-Z a-z 0-9 . _ - are allowed", id, i)
		default:
			return invalid("id %q contains %q; only A-Z a-z 0-9 . _ - are allowed", id, string(c))
		}
	}
	return nil
}

// ValidateTrustDomain checks a SPIFFE trust domain: 1 to 255 bytes of
// lowercase letters, digits, '.', '-' and '_' (SPIFFE-ID spec, section 2.1).
func ValidateTrustDomain(td string) error {
	if td == "" {
		return invalid("empty trust domain")
	}
	if len(td) > MaxTrustDomainLength {
		return invalid("trust domain is %d bytes long; the limit is %d", len(td), MaxTrustDomainLength)
	}
	for i := 0; i < len(td); i++ {
		c := td[i]
		if (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_' {
			continue
		}
		if c >= 'A' && c <= 'Z' {
			return invalid("trust domain %q must be lowercase", td)
		}
		return invalid("trust domain %q contains %q; only a-z 0-9 . - _ are allowed", td, string(c))
	}
	return nil
}

func isAlnum(c byte) bool {
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
}

// ID is a checked identity: spiffe://TrustDomain/Role/Name. The zero value is
// not a valid ID; make one with New or Parse.
type ID struct {
	TrustDomain string
	Role        Role
	Name        string
}

// New builds an ID after checking each part.
func New(trustDomain string, role Role, name string) (ID, error) {
	if err := ValidateTrustDomain(trustDomain); err != nil {
		return ID{}, err
	}
	if !role.Valid() {
		return ID{}, invalid("unknown role %q: want one of device, gateway, service, admin", string(role))
	}
	if err := ValidateID(name); err != nil {
		return ID{}, err
	}
	return ID{TrustDomain: trustDomain, Role: role, Name: name}, nil
}

// maxURILength bounds the input before any work is done on it: the longest
// valid ID is "spiffe://" + 255 + "/" + "gateway" + "/" + 64 bytes.
const maxURILength = len(Scheme) + 3 + MaxTrustDomainLength + 1 + len("gateway") + 1 + MaxIDLength

// Parse reads a SPIFFE ID of the form spiffe://<td>/<role>/<name>. It does
// its own parsing rather than url.Parse so that no alternative spelling
// (percent-encoding, upper-case scheme, port, empty segment) is accepted.
func Parse(s string) (ID, error) {
	if len(s) > maxURILength {
		return ID{}, invalid("SPIFFE ID is %d bytes long; the limit is %d", len(s), maxURILength)
	}
	rest, ok := strings.CutPrefix(s, Scheme+"://")
	if !ok {
		return ID{}, invalid("SPIFFE ID %q must start with \"spiffe://\"", s)
	}
	td, path, ok := strings.Cut(rest, "/")
	if !ok {
		return ID{}, invalid("SPIFFE ID %q has no path; want spiffe://<trust-domain>/<role>/<name>", s)
	}
	if err := ValidateTrustDomain(td); err != nil {
		return ID{}, fmt.Errorf("SPIFFE ID %q: %w", s, err)
	}
	role, name, ok := strings.Cut(path, "/")
	if !ok || strings.Contains(name, "/") {
		return ID{}, invalid("SPIFFE ID %q must have exactly two path segments, <role>/<name>", s)
	}
	r := Role(role)
	if !r.Valid() {
		return ID{}, invalid("SPIFFE ID %q has unknown role %q: want one of device, gateway, service, admin", s, role)
	}
	if err := ValidateID(name); err != nil {
		return ID{}, fmt.Errorf("SPIFFE ID %q: %w", s, err)
	}
	return ID{TrustDomain: td, Role: r, Name: name}, nil
}

// String returns the SPIFFE ID as a URI string.
func (id ID) String() string {
	return Scheme + "://" + id.TrustDomain + "/" + string(id.Role) + "/" + id.Name
}

// IsZero reports whether id is the zero ID.
func (id ID) IsZero() bool { return id == ID{} }

// URL returns the SPIFFE ID as the URI that goes into a certificate's
// subject alternative name.
func (id ID) URL() *url.URL {
	return &url.URL{Scheme: Scheme, Host: id.TrustDomain, Path: "/" + string(id.Role) + "/" + id.Name}
}

// FromURL checks a URI taken from a certificate. It re-parses the URI's
// canonical string, so anything url.Parse tolerated but Parse does not
// (percent-encoding, a port, a query) is refused.
func FromURL(u *url.URL) (ID, error) {
	if u == nil {
		return ID{}, invalid("no URI")
	}
	return Parse(u.String())
}
