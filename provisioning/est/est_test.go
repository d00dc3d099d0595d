package est

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
)

func TestParseBody(t *testing.T) {
	t.Parallel()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "d"}}, key)
	b64 := base64.StdEncoding.EncodeToString(der)
	wrapped := string(encodeBase64(der)) // CRLF every 64 characters
	cases := []struct {
		name, body string
		status     int
	}{
		{"ok/plain", b64, 0},
		{"ok/wrapped-crlf", wrapped, 0},
		{"ok/lf-and-spaces", " " + strings.ReplaceAll(wrapped, "\r\n", "\n") + "\n", 0},
		{"fail/empty", "", 400},
		{"fail/not-base64", "@@@@", 400},
		{"fail/url-alphabet", strings.NewReplacer("+", "-", "/", "_").Replace(b64) + "-_", 400},
		{"fail/too-large", base64.StdEncoding.EncodeToString(make([]byte, authority.MaxCSRBytes+1)), 413},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, ref := ParseBody([]byte(c.body))
			if c.status == 0 {
				if ref != nil || string(got) != string(der) {
					t.Fatalf("ParseBody: %v", ref)
				}
				return
			}
			if ref == nil || ref.Status != c.status {
				t.Fatalf("ParseBody = %v, want status %d", ref, c.status)
			}
		})
	}
}

func TestBearerOrBasic(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, header, want string
		ok                 bool
	}{
		{"ok/bearer", "Bearer fkt_x", "fkt_x", true},
		{"ok/bearer-case", "bearer   fkt_x ", "fkt_x", true},
		{"ok/basic", "Basic " + base64.StdEncoding.EncodeToString([]byte("station:fkt_y")), "fkt_y", true},
		{"fail/none", "", "", false},
		{"fail/empty-bearer", "Bearer ", "", false},
		{"fail/basic-no-password", "Basic " + base64.StdEncoding.EncodeToString([]byte("station:")), "", false},
		{"fail/huge", "Bearer " + strings.Repeat("a", 2000), "", false},
		{"fail/other-scheme", "Digest x", "", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := httptest.NewRequest("POST", "/", nil)
			if c.header != "" {
				r.Header.Set("Authorization", c.header)
			}
			got, ok := BearerOrBasic(r)
			if got != c.want || ok != c.ok {
				t.Fatalf("BearerOrBasic(%q) = %q, %v", c.header, got, ok)
			}
		})
	}
}

func TestReadCSRContentType(t *testing.T) {
	t.Parallel()
	for _, ct := range []string{"", "application/json", "application/pkcs10x", "text/plain"} {
		r := httptest.NewRequest("POST", "/", strings.NewReader("AAAA"))
		r.Header.Set("Content-Type", ct)
		if _, ref := readCSR(httptest.NewRecorder(), r); ref == nil || ref.Status != http.StatusUnsupportedMediaType {
			t.Errorf("Content-Type %q: %v", ct, ref)
		}
	}
	r := httptest.NewRequest("POST", "/", strings.NewReader("AAAA"))
	r.Header.Set("Content-Type", "application/pkcs10; charset=binary")
	if _, ref := readCSR(httptest.NewRecorder(), r); ref != nil {
		t.Errorf("parameters after the media type refused: %v", ref)
	}
}

// FuzzEnrollBody feeds arbitrary bodies through the whole EST request
// path: base64 decoding, the size bound, then the CSR policy. Nothing may
// panic, and anything accepted must name a valid device id.
func FuzzEnrollBody(f *testing.F) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, cn := range []string{"dev-1", "a/b", ""} {
		der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
		f.Add(encodeBase64(der))
	}
	f.Add([]byte("!!"))
	f.Add([]byte("MIIB\r\n"))
	policy := authority.Policy{TrustDomain: "fleet.test"}
	f.Fuzz(func(t *testing.T, body []byte) {
		der, ref := ParseBody(body)
		if ref != nil {
			if ref.Status != 400 && ref.Status != 413 {
				t.Fatalf("status %d", ref.Status)
			}
			return
		}
		req, err := policy.CheckCSR(der, identity.RoleDevice, "")
		if err != nil {
			if _, ok := authority.IsCSRError(err); !ok {
				t.Fatalf("not a CSR refusal: %v", err)
			}
			return
		}
		if identity.ValidateID(req.Name) != nil {
			t.Fatalf("accepted id %q", req.Name)
		}
	})
}
