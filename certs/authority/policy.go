package authority

import (
	"crypto/x509"
	"fmt"
	"strings"
	"time"

	"fleetkey.dev/certs/identity"
)

// KeyType names a kind of subject public key that a policy can accept.
type KeyType string

// The key types a CSR may carry. RSA is off unless a policy lists it, and
// then needs at least MinRSABits.
const (
	KeyP256    KeyType = "p256"
	KeyP384    KeyType = "p384"
	KeyEd25519 KeyType = "ed25519"
	KeyRSA     KeyType = "rsa"
)

// Bounds on RSA keys when a policy enables them. The upper bound keeps a
// hostile CSR from making the CA spend seconds on one signature check.
const (
	MinRSABits = 2048
	MaxRSABits = 8192
)

// DefaultKeyTypes is what a zero Policy accepts: the keys of the identity
// profile (P-256, and P-384 and Ed25519 where the device can).
var DefaultKeyTypes = []KeyType{KeyP256, KeyP384, KeyEd25519}

// Default certificate lifetimes per role.
var DefaultValidity = map[identity.Role]time.Duration{
	identity.RoleDevice:  90 * 24 * time.Hour,
	identity.RoleGateway: 365 * 24 * time.Hour,
	identity.RoleService: 365 * 24 * time.Hour,
	identity.RoleAdmin:   90 * 24 * time.Hour,
}

// MinValidity is the shortest lifetime a policy may set: device certificates
// can be made to live hours, not minutes, so renewal at 2/3 of the lifetime
// never turns into a storm.
const MinValidity = time.Hour

// Policy says what the CA issues. The zero value, with a TrustDomain, is the
// default policy of the identity profile.
type Policy struct {
	// TrustDomain of every SPIFFE ID issued. Required.
	TrustDomain string `yaml:"trust_domain"`
	// Validity per role; a missing or zero entry takes DefaultValidity.
	Validity map[identity.Role]time.Duration `yaml:"validity"`
	// KeyTypes accepted in CSRs; empty means DefaultKeyTypes.
	KeyTypes []KeyType `yaml:"key_types"`
}

// Validate checks the policy and names the key at fault.
func (p *Policy) Validate() error {
	if err := identity.ValidateTrustDomain(p.TrustDomain); err != nil {
		return fmt.Errorf("policy trust_domain: %w", err)
	}
	for role, d := range p.Validity {
		if !role.Valid() {
			return fmt.Errorf("policy validity: unknown role %q", role)
		}
		if d != 0 && d < MinValidity {
			return fmt.Errorf("policy validity.%s: %s is shorter than the minimum %s", role, d, MinValidity)
		}
	}
	for _, k := range p.KeyTypes {
		switch k {
		case KeyP256, KeyP384, KeyEd25519, KeyRSA:
		default:
			return fmt.Errorf("policy key_types: unknown key type %q: want p256, p384, ed25519 or rsa", k)
		}
	}
	return nil
}

// ValidityFor returns the lifetime of a new certificate for role.
func (p *Policy) ValidityFor(role identity.Role) time.Duration {
	if d := p.Validity[role]; d != 0 {
		return d
	}
	return DefaultValidity[role]
}

func (p *Policy) allows(k KeyType) bool {
	types := p.KeyTypes
	if len(types) == 0 {
		types = DefaultKeyTypes
	}
	for _, t := range types {
		if t == k {
			return true
		}
	}
	return false
}

func (p *Policy) allowedKeyTypes() string {
	types := p.KeyTypes
	if len(types) == 0 {
		types = DefaultKeyTypes
	}
	s := make([]string, len(types))
	for i, t := range types {
		s[i] = string(t)
	}
	return strings.Join(s, ", ")
}

// Profile is the fixed shape of a role's leaf certificates.
type Profile struct {
	Role        identity.Role
	ExtKeyUsage []x509.ExtKeyUsage
	// HostNames says whether DNS and IP SANs may be set (gateways only).
	HostNames bool
}

// Profiles holds the profile of every role. Devices and admins are TLS
// clients. Gateways are servers and also clients (of the provisioning
// service's revocation feed). Services are clients of the gateway and may
// also serve HTTPS (the provisioning service is one), so they may carry
// host names and serverAuth too.
var Profiles = map[identity.Role]Profile{
	identity.RoleDevice:  {Role: identity.RoleDevice, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}},
	identity.RoleGateway: {Role: identity.RoleGateway, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, HostNames: true},
	identity.RoleService: {Role: identity.RoleService, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, HostNames: true},
	identity.RoleAdmin:   {Role: identity.RoleAdmin, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}},
}
