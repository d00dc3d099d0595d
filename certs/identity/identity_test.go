package identity

import (
	"errors"
	"net/url"
	"strings"
	"testing"
)

func TestValidateID(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, id, reason string
	}{
		{"ok/simple", "sensor-0001", ""},
		{"ok/one-char", "a", ""},
		{"ok/dots-underscores", "line3.station_7-dev", ""},
		{"ok/64-chars", strings.Repeat("a", 64), ""},
		{"fail/empty", "", "empty id"},
		{"fail/65-chars", strings.Repeat("a", 65), "65 bytes long"},
		{"fail/slash", "a/b", "MQTT topic separator or wildcard"},
		{"fail/plus", "a+b", "MQTT topic separator or wildcard"},
		{"fail/hash", "a#", "MQTT topic separator or wildcard"},
		{"fail/dollar", "$SYS", "MQTT topic separator or wildcard"},
		{"fail/nul", "a\x00b", "NUL byte"},
		{"fail/non-ascii", "capteur-é", "non-ASCII"},
		{"fail/space", "a b", "only A-Z a-z 0-9"},
		{"fail/leading-dot", ".hidden", "must start with a letter or digit"},
		{"fail/leading-dash", "-x", "must start with a letter or digit"},
		{"fail/colon", "a:b", "only A-Z a-z 0-9"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			err := ValidateID(c.id)
			if c.reason == "" {
				if err != nil {
					t.Fatalf("ValidateID(%q) = %v, want nil", c.id, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("ValidateID(%q) = nil, want error containing %q", c.id, c.reason)
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.reason) {
				t.Fatalf("ValidateID(%q) = %v, want ErrInvalid containing %q", c.id, err, c.reason)
			}
		})
	}
}

func TestParse(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, in string
		want     ID
		reason   string
	}{
		{"ok/device", "spiffe://fleet.example/device/sensor-1", ID{"fleet.example", RoleDevice, "sensor-1"}, ""},
		{"ok/gateway", "spiffe://fleet.example/gateway/gw1", ID{"fleet.example", RoleGateway, "gw1"}, ""},
		{"ok/service", "spiffe://td/service/ingest", ID{"td", RoleService, "ingest"}, ""},
		{"ok/admin", "spiffe://td/admin/ops", ID{"td", RoleAdmin, "ops"}, ""},
		{"fail/scheme", "https://td/device/a", ID{}, "must start with"},
		{"fail/upper-scheme", "SPIFFE://td/device/a", ID{}, "must start with"},
		{"fail/no-path", "spiffe://td", ID{}, "has no path"},
		{"fail/one-segment", "spiffe://td/device", ID{}, "exactly two path segments"},
		{"fail/three-segments", "spiffe://td/device/a/b", ID{}, "exactly two path segments"},
		{"fail/trailing-slash", "spiffe://td/device/a/", ID{}, "exactly two path segments"},
		{"fail/role", "spiffe://td/root/a", ID{}, "unknown role"},
		{"fail/upper-td", "spiffe://TD/device/a", ID{}, "must be lowercase"},
		{"fail/port", "spiffe://td:443/device/a", ID{}, "contains \":\""},
		{"fail/userinfo", "spiffe://u@td/device/a", ID{}, "contains \"@\""},
		{"fail/query", "spiffe://td/device/a?x=1", ID{}, "only A-Z a-z 0-9"},
		{"fail/fragment", "spiffe://td/device/a#f", ID{}, "MQTT topic separator"},
		{"fail/percent", "spiffe://td/device/a%2Fb", ID{}, "only A-Z a-z 0-9"},
		{"fail/plus-name", "spiffe://td/device/+", ID{}, "MQTT topic separator"},
		{"fail/empty-name", "spiffe://td/device/", ID{}, "empty id"},
		{"fail/empty-td", "spiffe:///device/a", ID{}, "empty trust domain"},
		{"fail/too-long", "spiffe://" + strings.Repeat("a", 400) + "/device/a", ID{}, "the limit is"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			got, err := Parse(c.in)
			if c.reason == "" {
				if err != nil {
					t.Fatalf("Parse(%q) = %v", c.in, err)
				}
				if got != c.want {
					t.Fatalf("Parse(%q) = %+v, want %+v", c.in, got, c.want)
				}
				if got.String() != c.in {
					t.Fatalf("String() = %q, want %q", got.String(), c.in)
				}
				u, err := url.Parse(c.in)
				if err != nil {
					t.Fatal(err)
				}
				if back, err := FromURL(u); err != nil || back != got {
					t.Fatalf("FromURL(%q) = %+v, %v", c.in, back, err)
				}
				if got.URL().String() != c.in {
					t.Fatalf("URL() = %q, want %q", got.URL(), c.in)
				}
				return
			}
			if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.reason) {
				t.Fatalf("Parse(%q) = %+v, %v; want ErrInvalid containing %q", c.in, got, err, c.reason)
			}
		})
	}
}

func TestFromURLRefusesDecodedSpellings(t *testing.T) {
	t.Parallel()
	for _, raw := range []string{"spiffe://td/device/%61", "spiffe://td:1/device/a", "spiffe://td/device/a?q"} {
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		if id, err := FromURL(u); err == nil {
			t.Fatalf("FromURL(%q) = %+v, want refusal", raw, id)
		}
	}
	if _, err := FromURL(nil); err == nil {
		t.Fatal("FromURL(nil) succeeded")
	}
}

func TestNew(t *testing.T) {
	t.Parallel()
	if _, err := New("td", RoleDevice, "a/b"); err == nil {
		t.Fatal("New accepted a slash in the name")
	}
	if _, err := New("td", Role("root"), "a"); err == nil || !strings.Contains(err.Error(), "unknown role") {
		t.Fatalf("New with bad role: %v", err)
	}
	if _, err := New("T D", RoleDevice, "a"); err == nil {
		t.Fatal("New accepted a bad trust domain")
	}
	id, err := New("td", RoleService, "ingest")
	if err != nil || id.String() != "spiffe://td/service/ingest" {
		t.Fatalf("New = %v, %v", id, err)
	}
	if _, err := ParseRole("robot"); err == nil {
		t.Fatal("ParseRole accepted robot")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"spiffe://td/device/a", "spiffe://fleet.example/gateway/gw-1", "spiffe://td/device/a/b", "spiffe://td/device/%2F", "spiffe://Td/x/y", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error does not wrap ErrInvalid: %v", err)
			}
			return
		}
		// One spelling per identity: what parses prints back to itself, and
		// the name never carries a topic metacharacter.
		if id.String() != s {
			t.Fatalf("Parse(%q).String() = %q", s, id.String())
		}
		if strings.ContainsAny(id.Name, "/+#$\x00") {
			t.Fatalf("Parse(%q) accepted name %q", s, id.Name)
		}
		if back, err := FromURL(id.URL()); err != nil || back != id {
			t.Fatalf("URL round trip of %q: %+v, %v", s, back, err)
		}
	})
}

func FuzzValidateID(f *testing.F) {
	for _, s := range []string{"a", "sensor-1", "a/b", "+", "#", "$SYS", "\x00", "é", strings.Repeat("x", 65)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		err := ValidateID(s)
		valid := len(s) >= 1 && len(s) <= MaxIDLength && isAlnum(s[0])
		for i := 0; i < len(s) && valid; i++ {
			valid = isAlnum(s[i]) || s[i] == '.' || s[i] == '_' || s[i] == '-'
		}
		if (err == nil) != valid {
			t.Fatalf("ValidateID(%q) = %v, grammar says valid=%v", s, err, valid)
		}
	})
}
