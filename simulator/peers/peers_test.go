package peers

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// testPKI is a throwaway PKI: a CA that signs the server certificate (for
// 127.0.0.1) and a client certificate, plus a client certificate from
// another CA, which the brokers must refuse.
type testPKI struct {
	files     TLSFiles
	roots     *x509.CertPool  // to verify the server
	client    tls.Certificate // signed by the broker's CA
	strangerC tls.Certificate // signed by another CA
}

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var serial int64

func nextSerial() *big.Int { serial++; return big.NewInt(serial) }

func newCA(t *testing.T, name string) testCA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          nextSerial(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return testCA{cert, key}
}

// issue returns a leaf certificate and key signed by ca, as PEM.
func (ca testCA) issue(t *testing.T, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	dir := t.TempDir()
	ca := newCA(t, "peers test CA")
	other := newCA(t, "stranger CA")
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pair := func(c, k []byte) tls.Certificate {
		cert, err := tls.X509KeyPair(c, k)
		if err != nil {
			t.Fatal(err)
		}
		return cert
	}
	srvCert, srvKey := ca.issue(t, "127.0.0.1", true)
	cliCert, cliKey := ca.issue(t, "device-1", false)
	strCert, strKey := other.issue(t, "device-1", false)
	p := &testPKI{
		files: TLSFiles{
			CAFile:   write("ca.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})),
			CertFile: write("server.pem", srvCert),
			KeyFile:  write("server.key", srvKey),
		},
		roots:     x509.NewCertPool(),
		client:    pair(cliCert, cliKey),
		strangerC: pair(strCert, strKey),
	}
	p.roots.AddCert(ca.cert)
	return p
}

// connect connects an MQTT 3.1.1 client over tls:// with the given client
// certificates (none, one); it returns the client or the CONNECT error.
func connect(t *testing.T, addr, id string, roots *x509.CertPool, certs ...tls.Certificate) (paho.Client, error) {
	t.Helper()
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if len(certs) > 0 {
		// Present the certificate whatever CAs the server asks for: Go's
		// client would otherwise send none when its issuer is not among
		// them, and the server's own verification would go untested.
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &certs[0], nil }
	}
	opts := paho.NewClientOptions().
		AddBroker("tls://" + addr).
		SetClientID(id).
		SetTLSConfig(cfg).
		SetConnectTimeout(10 * time.Second).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetCleanSession(true)
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(20 * time.Second) {
		return nil, errors.New("CONNECT timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	return c, nil
}

func wait(t *testing.T, what string, tok paho.Token) {
	t.Helper()
	if !tok.WaitTimeout(10 * time.Second) {
		t.Fatalf("%s: timed out", what)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// checkBroker checks that the broker at addr serves a QoS 1 round trip to a
// client with a good certificate, and refuses clients without a certificate
// or with one from another CA.
func checkBroker(t *testing.T, addr string, pki *testPKI) {
	t.Helper()
	c, err := connect(t, addr, "good", pki.roots, pki.client)
	if err != nil {
		t.Fatalf("client with a good certificate: %v", err)
	}
	defer c.Disconnect(100)
	got := make(chan paho.Message, 1)
	wait(t, "subscribe", c.Subscribe("peers/test", 1, func(_ paho.Client, m paho.Message) {
		select {
		case got <- m:
		default:
		}
	}))
	wait(t, "publish", c.Publish("peers/test", 1, false, []byte("hello")))
	select {
	case m := <-got:
		if string(m.Payload()) != "hello" || m.Qos() != 1 {
			t.Fatalf("received %q at QoS %d, want \"hello\" at QoS 1", m.Payload(), m.Qos())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("QoS 1 message not received within 10 s")
	}

	if c, err := connect(t, addr, "no-cert", pki.roots); err == nil {
		c.Disconnect(0)
		t.Error("client without a certificate was accepted")
	} else {
		t.Logf("client without a certificate refused: %v", err)
	}
	if c, err := connect(t, addr, "stranger", pki.roots, pki.strangerC); err == nil {
		c.Disconnect(0)
		t.Error("client with a certificate from another CA was accepted")
	} else {
		t.Logf("client with another CA's certificate refused: %v", err)
	}
}

func checkRSS(t *testing.T, p *Peer) {
	t.Helper()
	rss, err := p.RSS()
	if err != nil {
		t.Fatal(err)
	}
	if rss <= 0 {
		t.Fatalf("RSS of %s (pid %d) = %d, want > 0", p.Name, p.PID, rss)
	}
	t.Logf("%s pid %d RSS %d KiB", p.Name, p.PID, rss/1024)
}

// checkNofile checks that child pid may open as many files as this
// process's hard limit allows, not the lower soft limit Go restores for
// children by default.
func checkNofile(t *testing.T, pid int) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			soft := strings.Fields(rest)[0]
			if soft != fmt.Sprint(lim.Max) {
				t.Fatalf("pid %d may open %s files, want %d (the hard limit)", pid, soft, lim.Max)
			}
			t.Logf("pid %d may open %s files", pid, soft)
			return
		}
	}
	t.Fatalf("no Max open files in /proc/%d/limits", pid)
}

func checkClosed(t *testing.T, addr string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err == nil {
		c.Close()
		t.Fatalf("%s still accepts connections after Stop", addr)
	}
}

func startCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestMosquitto(t *testing.T) {
	pki := newTestPKI(t)
	p, err := StartMosquitto(startCtx(t), t.TempDir(), pki.files)
	if errors.Is(err, ErrNotInstalled) {
		t.Skipf("skipping: mosquitto is not installed (%v)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Stop() })
	if p.Name != "mosquitto" || p.PID == os.Getpid() || !strings.HasPrefix(p.Addr, "127.0.0.1:") || strings.HasSuffix(p.Addr, ":1883") {
		t.Fatalf("peer %+v", p)
	}
	if !strings.HasPrefix(p.Version, "2.") {
		t.Fatalf("mosquitto version %q, want 2.x", p.Version)
	}
	t.Logf("mosquitto %s on %s, log %s", p.Version, p.Addr, p.LogFile)
	checkBroker(t, p.Addr, pki)
	checkRSS(t, p)
	checkNofile(t, p.PID)
	if err := p.Stop(); err != nil {
		t.Fatalf("Stop: %v\n%s", err, fileTail(p.LogFile, 2048))
	}
	t.Logf("mosquitto log:\n%s", fileTail(p.LogFile, 4096))
	select {
	case <-p.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	checkClosed(t, p.Addr)
}

func TestMosquittoBadConfig(t *testing.T) {
	pki := newTestPKI(t)
	files := pki.files
	files.KeyFile = filepath.Join(t.TempDir(), "missing.key")
	_, err := StartMosquitto(startCtx(t), t.TempDir(), files)
	if errors.Is(err, ErrNotInstalled) {
		t.Skipf("skipping: mosquitto is not installed (%v)", err)
	}
	if err == nil {
		t.Fatal("mosquitto started with a missing key file")
	}
	if !strings.Contains(err.Error(), "missing.key") {
		t.Fatalf("error does not show mosquitto's log: %v", err)
	}
	t.Log(err)
}

func TestMosquittoNotInstalled(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	saved := mosquittoCandidates
	mosquittoCandidates = []string{filepath.Join(t.TempDir(), "mosquitto")}
	t.Cleanup(func() { mosquittoCandidates = saved })
	_, err := StartMosquitto(t.Context(), t.TempDir(), newTestPKI(t).files)
	if !errors.Is(err, ErrNotInstalled) {
		t.Fatalf("err = %v, want ErrNotInstalled", err)
	}
}

func TestMochi(t *testing.T) {
	pki := newTestPKI(t)
	p, err := StartMochi(startCtx(t), pki.files)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Stop() })
	if p.Name != "mochi" || p.PID != os.Getpid() || !strings.HasPrefix(p.Addr, "127.0.0.1:") {
		t.Fatalf("peer %+v", p)
	}
	checkBroker(t, p.Addr, pki)
	checkRSS(t, p)
	if err := p.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	<-p.Done()
	checkClosed(t, p.Addr)
}

const helperEnv = "PEERS_TEST_HELPER"

// TestHelperProcess is not a test: it is the child process of
// TestMochiMainProcess, which re-runs this test binary with helperEnv set.
// It runs MochiMain with the arguments after "--" until SIGTERM.
func TestHelperProcess(t *testing.T) {
	if os.Getenv(helperEnv) != "mochi" {
		return
	}
	args := os.Args
	for i, a := range args {
		if a == "--" {
			args = args[i+1:]
			break
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := MochiMain(ctx, args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	os.Exit(0)
}

func helperCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^TestHelperProcess$", "--"}, args...)...)
	// The race detector's runtime otherwise sleeps 1 s at exit, which
	// would make Stop look slow.
	cmd.Env = append(os.Environ(), helperEnv+"=mochi", "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	return cmd
}

func TestMochiMainProcess(t *testing.T) {
	pki := newTestPKI(t)
	addrFile := filepath.Join(t.TempDir(), "mochi.addr")
	cmd := helperCmd("--ca", pki.files.CAFile, "--cert", pki.files.CertFile, "--key", pki.files.KeyFile,
		"--listen", "127.0.0.1:0", "--addr-file", addrFile)
	t0 := time.Now()
	p, err := StartProcess(startCtx(t), "mochi-process", addrFile, cmd)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("started in %v", time.Since(t0))
	t.Cleanup(func() { _ = p.Stop() })
	if p.PID == os.Getpid() || p.PID != cmd.Process.Pid || !strings.HasPrefix(p.Addr, "127.0.0.1:") {
		t.Fatalf("peer %+v (cmd pid %d)", p, cmd.Process.Pid)
	}
	checkBroker(t, p.Addr, pki)
	checkRSS(t, p)
	t0 = time.Now()
	if err := p.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	t.Logf("stopped in %v", time.Since(t0))
	select {
	case <-p.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	checkClosed(t, p.Addr)
	if _, err := os.Stat(addrFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("address file left behind: %v", err)
	}
}

func TestStartProcessChildFails(t *testing.T) {
	addrFile := filepath.Join(t.TempDir(), "mochi.addr")
	_, err := StartProcess(startCtx(t), "mochi-process", addrFile, helperCmd("--ca", "/nonexistent/ca.pem",
		"--cert", "x", "--key", "y", "--addr-file", addrFile))
	if err == nil {
		t.Fatal("StartProcess succeeded with a child that cannot start")
	}
	if !strings.Contains(err.Error(), "/nonexistent/ca.pem") {
		t.Fatalf("error does not include the child's stderr: %v", err)
	}
	t.Log(err)
}

func TestMochiMainRefusesSystemPort(t *testing.T) {
	pki := newTestPKI(t)
	err := MochiMain(t.Context(), []string{"--ca", pki.files.CAFile, "--cert", pki.files.CertFile, "--key", pki.files.KeyFile,
		"--listen", "127.0.0.1:1883", "--addr-file", filepath.Join(t.TempDir(), "addr")})
	if err == nil || !strings.Contains(err.Error(), "1883") {
		t.Fatalf("err = %v, want a refusal of port 1883", err)
	}
}

func TestParseVmRSS(t *testing.T) {
	status := "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    5700 kB\nThreads:\t1\n"
	got, err := parseVmRSS([]byte(status), 1)
	if err != nil || got != 5700*1024 {
		t.Fatalf("parseVmRSS = %d, %v; want %d", got, err, 5700*1024)
	}
	if _, err := parseVmRSS([]byte("Name:\tx\n"), 1); err == nil {
		t.Fatal("parseVmRSS without VmRSS: no error")
	}
	if _, err := RSS(os.Getpid()); err != nil {
		t.Fatal(err)
	}
}

// TestReadAddrFile: an address is taken only once its line is whole; a
// line that is no address is an error.
func TestReadAddrFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "addr")
	for _, c := range []struct{ content, addr, err string }{
		{"", "", ""},
		{"127.0.0.", "", ""}, // half-way through a write
		{"127.0.0.1:8883\n", "127.0.0.1:8883", ""},
		{"nowhere\n", "", "bad address"},
	} {
		if err := os.WriteFile(p, []byte(c.content), 0o600); err != nil {
			t.Fatal(err)
		}
		addr, err := readAddrFile(p)
		if addr != c.addr || (c.err == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), c.err) {
			t.Errorf("%q: %q, %v; want %q, %q", c.content, addr, err, c.addr, c.err)
		}
	}
	if addr, err := readAddrFile(filepath.Join(t.TempDir(), "none")); addr != "" || err != nil {
		t.Errorf("no file: %q, %v", addr, err)
	}
}
