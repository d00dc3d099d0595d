package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/pkidir"
	"fleetkey.dev/certs/tpm"
	"fleetkey.dev/certs/tpm/tpmsim"
	"fleetkey.dev/device-agent/agent"
)

// stack is the real provisioning service, gateway and device agent, as
// processes built from this workspace, on loopback.
type stack struct {
	t                     *testing.T
	dir, pki, data        string
	provBin, gwBin, agBin string
	env                   []string
	provURL               string
	gwAddr                string
	gw                    *exec.Cmd
	sink                  string
	gwConfig              string
}

func build(t *testing.T, dir, pkg, name string) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("the go tool is not on PATH; it builds the programs under test")
	}
	out := filepath.Join(dir, name)
	if b, err := exec.Command(goTool, "build", "-o", out, pkg).CombinedOutput(); err != nil {
		t.Fatalf("building %s (needs the go.work workspace): %v\n%s", pkg, err, b)
	}
	return out
}

func newStack(t *testing.T) *stack { return newStackWith(t, "", "") }

// newStackWith starts the stack with a provisioning and a gateway YAML
// configuration ("" for none).
func newStackWith(t *testing.T, provConfig, gwConfig string) *stack {
	if testing.Short() {
		t.Skip("builds and runs provisioning, gateway and agent")
	}
	dir := t.TempDir()
	s := &stack{t: t, dir: dir, pki: filepath.Join(dir, "pki"), data: filepath.Join(dir, "data"), sink: filepath.Join(dir, "telemetry.jsonl")}
	s.provBin = build(t, dir, "fleetkey.dev/provisioning/cmd/provisioning", "provisioning")
	s.gwBin = build(t, dir, "fleetkey.dev/gateway/cmd/gateway", "gateway")
	s.agBin = build(t, dir, ".", "device-agent")
	pass := "device agent end-to-end passphrase"
	if _, err := pkidir.Init(s.pki, pkidir.InitOptions{TrustDomain: "fleet.test", Passphrase: &pkidir.Passphrase{Secret: []byte(pass), Source: "test"},
		Options: pkidir.Options{KDFIterations: 10000}}); err != nil {
		t.Fatal(err)
	}
	s.env = append(os.Environ(), pkidir.EnvPassphrase+"="+pass)
	provArgs := []string{"serve", "--pki", s.pki, "--data", s.data}
	if provConfig != "" {
		path := filepath.Join(dir, "provisioning.yaml")
		os.WriteFile(path, []byte(provConfig), 0o600)
		provArgs = append(provArgs, "--config", path)
	}
	provAddr, _ := s.start(s.provBin, "", provArgs...)
	s.provURL = "https://localhost:" + provAddr[strings.LastIndex(provAddr, ":")+1:]
	if gwConfig != "" {
		s.gwConfig = filepath.Join(dir, "gateway.yaml")
		os.WriteFile(s.gwConfig, []byte(gwConfig), 0o600)
	}
	s.startGateway("127.0.0.1:0")
	return s
}

func (s *stack) run(name string, args ...string) string {
	s.t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = s.env
	out, err := cmd.CombinedOutput()
	if err != nil {
		s.t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// start runs a server with --addr-file and returns its address.
func (s *stack) start(bin, listen string, args ...string) (string, *exec.Cmd) {
	s.t.Helper()
	fifo := filepath.Join(s.dir, fmt.Sprintf("%s-%d.addr", filepath.Base(bin), time.Now().UnixNano()))
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		s.t.Fatal(err)
	}
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	cmd := exec.Command(bin, append(args, "--listen", listen, "--metrics-listen", "off", "--addr-file", fifo)...)
	cmd.Env = s.env
	logf, _ := os.Create(filepath.Join(s.dir, filepath.Base(bin)+".log"))
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait(); logf.Close() })
	got := make(chan []byte, 1)
	go func() { b, _ := os.ReadFile(fifo); got <- b }()
	select {
	case b := <-got:
		return strings.TrimSpace(string(b)), cmd
	case <-time.After(30 * time.Second):
		s.t.Fatalf("%s did not start", filepath.Base(bin))
	}
	return "", nil
}

func (s *stack) startGateway(listen string) {
	args := []string{"serve", "--pki", s.pki, "--provisioning", s.provURL, "--telemetry-sink", s.sink}
	if s.gwConfig != "" {
		args = append(args, "--config", s.gwConfig)
	}
	s.gwAddr, s.gw = s.start(s.gwBin, listen, args...)
}

// enroll enrolls a device with the agent CLI and returns its state dir.
func (s *stack) enroll(id string) string {
	token, _, _ := strings.Cut(s.run(s.provBin, "token", "create", "--data", s.data, "--prefix", id, "--max-uses", "1", "--expires", "1h"), "\n")
	dir := filepath.Join(s.dir, id)
	out := s.run(s.agBin, "enroll", "--provisioning", s.provURL, "--ca", filepath.Join(s.pki, "root.crt"), "--token", token, "--id", id, "--dir", dir)
	if !strings.Contains(out, "enrolled spiffe://fleet.test/device/"+id) {
		s.t.Fatalf("enroll said: %s", out)
	}
	if fi, err := os.Stat(filepath.Join(dir, "device.key")); err != nil || fi.Mode().Perm() != 0o600 {
		s.t.Fatalf("device key: %v %v", fi, err)
	}
	return dir
}

// service connects the fleet's service identity and subscribes to the
// decrypted telemetry; each message's body goes to got.
func (s *stack) service(got chan<- string) paho.Client {
	s.t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(s.pki, "service.crt"), filepath.Join(s.pki, "service.key"))
	if err != nil {
		s.t.Fatal(err)
	}
	bundle, _ := pkidir.LoadBundle(s.pki)
	opts := paho.NewClientOptions().AddBroker("tls://" + s.gwAddr).SetClientID("service").SetProtocolVersion(4).
		SetTLSConfig(&tls.Config{RootCAs: bundle.RootPool(), ServerName: "localhost", Certificates: []tls.Certificate{cert}}).
		SetAutoReconnect(true).SetMaxReconnectInterval(time.Second).SetCleanSession(true).
		SetOnConnectHandler(func(c paho.Client) {
			c.Subscribe("fleet/telemetry/#", 1, func(_ paho.Client, m paho.Message) { got <- string(m.Payload()) })
		})
	c := paho.NewClient(opts)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		s.t.Fatalf("service connect: %v", tok.Error())
	}
	s.t.Cleanup(func() { c.Disconnect(0) })
	return c
}

type sinkLine struct {
	Device   string `json:"device"`
	Channel  string `json:"channel"`
	RecordID uint64 `json:"record_id"`
	Body     string `json:"body"`
}

// checkSink asserts the sink holds exactly want for device, once each, in
// order, with strictly rising record ids.
func (s *stack) checkSink(device string, want []string) {
	s.t.Helper()
	f, err := os.Open(s.sink)
	if err != nil {
		s.t.Fatal(err)
	}
	defer f.Close()
	var got []sinkLine
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var l sinkLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			s.t.Fatalf("sink line %q: %v", sc.Text(), err)
		}
		if l.Device == device {
			got = append(got, l)
		}
	}
	if len(got) != len(want) {
		seen := map[string]int{}
		for _, l := range got {
			seen[l.Body]++
		}
		lost, dup := 0, 0
		for _, w := range want {
			switch seen[w] {
			case 0:
				lost++
			case 1:
			default:
				dup++
			}
		}
		s.t.Fatalf("sink holds %d records of %s; want %d (%d lost, %d duplicated)", len(got), device, len(want), lost, dup)
	}
	for i, l := range got {
		if l.Body != want[i] || (i > 0 && l.RecordID <= got[i-1].RecordID) || l.Channel != "telemetry" {
			s.t.Fatalf("sink record %d: %+v; want body %q after record id %d", i, l, want[i], got[max(i-1, 0)].RecordID)
		}
	}
}

// agentProc is a running `device-agent run`.
type agentProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string // its stdout, line by line
	done  chan error
}

func (s *stack) runAgent(dir string, extra ...string) *agentProc {
	s.t.Helper()
	cmd := exec.Command(s.agBin, append([]string{"run", "--dir", dir, "--gateway", s.gwAddr, "--exit-when-done", "--log-level", "debug"}, extra...)...)
	logf, _ := os.Create(filepath.Join(s.dir, filepath.Base(dir)+"-agent.log"))
	cmd.Stderr = logf
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	p := &agentProc{cmd: cmd, stdin: stdin, lines: make(chan string, 16), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		p.done <- cmd.Wait()
		logf.Close()
	}()
	s.t.Cleanup(func() { cmd.Process.Kill() })
	return p
}

func (p *agentProc) wait(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case err := <-p.done:
		if err != nil {
			t.Fatalf("device-agent exited: %v", err)
		}
	case <-time.After(d):
		t.Fatalf("device-agent still running after %s", d)
	}
}

func records(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf(`{"%s":%d}`, prefix, i+1)
	}
	return out
}

// TestEndToEnd: enroll, connect, handshake, 10,000 records through the
// real gateway into the sink exactly once and in order, and a command
// back to the device.
func TestEndToEnd(t *testing.T) {
	s := newStack(t)
	dir := s.enroll("e2e-0001")
	got := make(chan string, 20000)
	svc := s.service(got)
	want := records("n", 10000)
	p := s.runAgent(dir, "--source", "stdin")
	go func() {
		w := bufio.NewWriter(p.stdin)
		for _, r := range want {
			fmt.Fprintln(w, r)
		}
		w.Flush()
	}()
	// The first record at the service means the epoch is confirmed; then a
	// command goes back.
	select {
	case <-got:
	case <-time.After(30 * time.Second):
		t.Fatal("no telemetry reached the service")
	}
	if tok := svc.Publish("fleet/commands/e2e-0001/config", 1, false, `{"interval":"5s"}`); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publishing a command: %v", tok.Error())
	}
	select {
	case l := <-p.lines:
		var c struct {
			Channel, Body string
			ID            uint64
		}
		if err := json.Unmarshal([]byte(l), &c); err != nil || c.Channel != "config" || c.Body != `{"interval":"5s"}` || c.ID == 0 {
			t.Fatalf("the device printed %q", l)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the command did not reach the device")
	}
	status := s.run(s.agBin, "status", "--dir", dir)
	for _, w := range []string{"device        e2e-0001", "connected to " + s.gwAddr, "key epoch     kid "} {
		if !strings.Contains(status, w) {
			t.Fatalf("status lacks %q:\n%s", w, status)
		}
	}
	p.stdin.Close() // the source ends; the agent exits once all is acknowledged
	p.wait(t, 2*time.Minute)
	s.checkSink("e2e-0001", want)
	// The service saw every record (QoS 1: at least once).
	seen := map[string]bool{}
	for len(seen) < len(want) {
		select {
		case b := <-got:
			seen[b] = true
		case <-time.After(10 * time.Second):
			if len(seen) < len(want)-1 { // the first was taken above
				t.Fatalf("the service received %d of %d records", len(seen), len(want))
			}
			return
		}
	}
}

// TestGatewayKilledMidStream: kill -9 the gateway while records flow,
// restart it on the same address; the sink ends with every record exactly
// once, in order.
func TestGatewayKilledMidStream(t *testing.T) {
	s := newStack(t)
	dir := s.enroll("e2e-0002")
	got := make(chan string, 50000)
	s.service(got)
	want := records("k", 20000)
	src := filepath.Join(s.dir, "records.txt")
	if err := os.WriteFile(src, []byte(strings.Join(want, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	p := s.runAgent(dir, "--source", "file:"+src)
	var n atomic.Int64
	half := make(chan struct{})
	var once sync.Once
	go func() {
		for range got {
			if n.Add(1) == 3000 {
				once.Do(func() { close(half) })
			}
		}
	}()
	select {
	case <-half:
	case <-time.After(60 * time.Second):
		t.Fatalf("only %d records arrived", n.Load())
	}
	s.gw.Process.Signal(syscall.SIGKILL)
	s.gw.Wait()
	s.startGateway(s.gwAddr)
	p.wait(t, 3*time.Minute)
	s.checkSink("e2e-0002", want)
	log, _ := os.ReadFile(filepath.Join(s.dir, "e2e-0002-agent.log"))
	if c := strings.Count(string(log), "msg=connected"); c < 2 {
		t.Fatalf("the agent connected %d times; the kill should have made it reconnect", c)
	}
}

// TestEnrollRenewAndRefusals: the agent's EST client against the real
// provisioning service: refusals come back with the service's reason, a
// state directory is never overwritten, and a renewal replaces key and
// certificate together.
func TestEnrollRenewAndRefusals(t *testing.T) {
	s := newStack(t)
	ca := filepath.Join(s.pki, "root.crt")
	fail := func(want string, args ...string) {
		t.Helper()
		out, err := exec.Command(s.agBin, args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), want) {
			t.Fatalf("device-agent %s: %v\n%s\nwant %q", strings.Join(args, " "), err, out, want)
		}
	}
	dir := filepath.Join(s.dir, "refused")
	fail("401", "enroll", "--provisioning", s.provURL, "--ca", ca, "--token", "fkt_aaaaaaaaaaaa_"+strings.Repeat("b", 43), "--id", "dev-x", "--dir", dir)
	fail("want https://host:port", "enroll", "--provisioning", "http://localhost:1", "--ca", ca, "--token", "t", "--id", "dev-x", "--dir", dir)
	fail("enroll needs", "enroll", "--provisioning", s.provURL, "--dir", dir)
	fail("holds no certificate", "enroll", "--provisioning", s.provURL, "--ca", filepath.Join(s.pki, "gateway.key"), "--token", "t", "--id", "dev-x", "--dir", dir)
	// Another CA's root: the provisioning service's certificate is refused.
	other := filepath.Join(s.dir, "other")
	if _, err := pkidir.Init(other, pkidir.InitOptions{TrustDomain: "other.test", Passphrase: &pkidir.Passphrase{Secret: []byte("another fleet passphrase"), Source: "test"}, Options: pkidir.Options{KDFIterations: 1000}}); err != nil {
		t.Fatal(err)
	}
	fail("certificate signed by unknown authority", "enroll", "--provisioning", s.provURL, "--ca", filepath.Join(other, "root.crt"), "--token", "t", "--id", "dev-x", "--dir", dir)
	if _, err := os.Stat(filepath.Join(dir, "device.key")); err == nil {
		t.Fatal("a refused enrollment left a key behind")
	}

	good := s.enroll("dev-renew")
	fail("already holds an enrolled device", "enroll", "--provisioning", s.provURL, "--ca", ca, "--token", "t", "--id", "dev-renew", "--dir", good)
	fail("unknown command", "frobnicate")
	fail("--suite 3", "run", "--dir", good, "--gateway", s.gwAddr, "--suite", "3")
	fail("--source", "run", "--dir", good, "--gateway", s.gwAddr, "--source", "carrier-pigeon")

	st := &agent.State{Dir: good}
	before, err := st.LoadCredentials()
	if err != nil {
		t.Fatal(err)
	}
	renewed, err := st.Renew(t.Context(), before, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	after, err := st.LoadCredentials()
	if err != nil {
		t.Fatal(err)
	}
	if after.Leaf.SerialNumber.Cmp(before.Leaf.SerialNumber) == 0 || !after.Leaf.Equal(renewed.Leaf) {
		t.Fatal("renewal did not replace the certificate")
	}
	if after.Leaf.URIs[0].String() != before.Leaf.URIs[0].String() {
		t.Fatalf("renewal changed the identity: %s", after.Leaf.URIs[0])
	}
	// The new pair connects and runs fkx1.
	got := make(chan string, 10)
	s.service(got)
	p := s.runAgent(good, "--source", "stdin")
	fmt.Fprintln(p.stdin, `{"after":"renewal"}`)
	select {
	case b := <-got:
		if b != `{"after":"renewal"}` {
			t.Fatalf("service got %q", b)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no telemetry with the renewed certificate")
	}
	p.stdin.Close()
	p.wait(t, 30*time.Second)
}

// TestRotationInFlight: with epochs every second and generations every
// 300 ms, records keep flowing across rekeys on one connection and reach
// the sink exactly once, in order.
func TestRotationInFlight(t *testing.T) {
	s := newStack(t)
	dir := s.enroll("e2e-rot")
	want := records("r", 500)
	src := filepath.Join(s.dir, "slow.sh")
	script := "for l in $(cat " + filepath.Join(s.dir, "rot.txt") + "); do echo \"$l\"; sleep 0.01; done\n"
	os.WriteFile(filepath.Join(s.dir, "rot.txt"), []byte(strings.Join(want, "\n")+"\n"), 0o644)
	os.WriteFile(src, []byte(script), 0o755)
	p := s.runAgent(dir, "--source", "cmd:sh "+src, "--epoch-every", "1s", "--generation-every", "300ms", "--suite", "2")
	p.wait(t, 2*time.Minute)
	s.checkSink("e2e-rot", want)
	log, _ := os.ReadFile(filepath.Join(s.dir, "e2e-rot-agent.log"))
	// The source takes at least 5 s (500 records, 10 ms apart); with an
	// epoch due every second, at least one rekey happens mid-stream even on
	// a loaded machine.
	if n := strings.Count(string(log), "msg=\"new epoch\""); n < 2 {
		t.Fatalf("%d epochs in a run of at least 5 s with --epoch-every 1s", n)
	}
	if strings.Contains(string(log), "connection ended") || strings.Contains(string(log), "connection lost") {
		t.Fatalf("a rekey cost the connection:\n%s", log)
	}
}

// TestTPMEndToEnd: a device whose key is made in swtpm enrolls through TPM
// attestation (its EK trusted by its EK certificate from swtpm's
// manufacturer CA), connects to a gateway that admits only TPM-bound
// devices with a TPM-signed mTLS handshake, runs fkx1 with a TPM
// signature, and sends telemetry.
func TestTPMEndToEnd(t *testing.T) {
	spec := tpmsim.StartSWTPM(t, true)
	ca := "/var/lib/swtpm-localca/"
	if _, err := os.Stat(ca + "swtpm-localca-rootca-cert.pem"); err != nil {
		t.Skipf("swtpm's local CA: %v", err)
	}
	s := newStackWith(t, "ek_roots: ["+ca+"swtpm-localca-rootca-cert.pem, "+ca+"issuercert.pem]\n", "require_tpm: true\n")
	token, _, _ := strings.Cut(s.run(s.provBin, "token", "create", "--data", s.data, "--prefix", "tpm-", "--max-uses", "2", "--expires", "1h", "--require-tpm"), "\n")
	dir := filepath.Join(s.dir, "tpm-0001")
	// Plain EST enrollment with this token is refused.
	if out, err := exec.Command(s.agBin, "enroll", "--provisioning", s.provURL, "--ca", filepath.Join(s.pki, "root.crt"), "--token", token,
		"--id", "tpm-0009", "--dir", filepath.Join(s.dir, "soft")).CombinedOutput(); err == nil || !strings.Contains(string(out), "tpm-required") && !strings.Contains(string(out), "requires TPM attestation") {
		t.Fatalf("plain enrollment with a require-TPM token: %v\n%s", err, out)
	}
	out := s.run(s.agBin, "enroll", "--provisioning", s.provURL, "--ca", filepath.Join(s.pki, "root.crt"), "--token", token, "--id", "tpm-0001", "--dir", dir, "--tpm", spec)
	if !strings.Contains(out, "TPM-bound") {
		t.Fatalf("enroll said: %s", out)
	}
	if _, err := os.Stat(filepath.Join(dir, "device.key")); err == nil {
		t.Fatal("a software key file was written for a TPM device")
	}
	inspect := s.run(build(t, s.dir, "fleetkey.dev/certs/cmd/certs", "certs"), "inspect", filepath.Join(dir, "device.crt"))
	if !strings.Contains(inspect, "yes, EK SHA-256") {
		t.Fatalf("certs inspect shows no TPM binding:\n%s", inspect)
	}
	got := make(chan string, 10)
	s.service(got)
	p := s.runAgent(dir, "--source", "stdin")
	want := records("tpm", 20)
	for _, r := range want {
		fmt.Fprintln(p.stdin, r)
	}
	for i := range want {
		select {
		case <-got:
		case <-time.After(30 * time.Second):
			t.Fatalf("%d of %d records reached the service", i, len(want))
		}
	}
	p.stdin.Close()
	p.wait(t, 30*time.Second)
	s.checkSink("tpm-0001", want)
	if st := s.run(s.agBin, "status", "--dir", dir); !strings.Contains(st, "in the TPM") {
		t.Fatalf("status:\n%s", st)
	}

	// The allowlist path: a TPM without an EK certificate is refused until
	// an operator adds its EK with `provisioning ek add`.
	plain := tpmsim.StartSWTPM(t, false)
	d, err := tpm.Open(plain)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := d.EK()
	d.Close()
	if err != nil {
		t.Fatal(err)
	}
	spki, _ := x509.MarshalPKIXPublicKey(ek.Key)
	hash := sha256.Sum256(spki)
	enrollArgs := []string{"enroll", "--provisioning", s.provURL, "--ca", filepath.Join(s.pki, "root.crt"), "--token", token, "--id", "tpm-0002", "--dir", filepath.Join(s.dir, "tpm-0002"), "--tpm", plain}
	if out, err := exec.Command(s.agBin, enrollArgs...).CombinedOutput(); err == nil || !strings.Contains(string(out), "ek-untrusted") {
		t.Fatalf("an unknown EK: %v\n%s", err, out)
	}
	os.RemoveAll(filepath.Join(s.dir, "tpm-0002"))
	// The factory station reads the hash with the agent, and the operator
	// adds it.
	ekOut := s.run(s.agBin, "ek", "--tpm", plain)
	if !strings.Contains(ekOut, "EK SHA-256   "+hex.EncodeToString(hash[:])) || !strings.Contains(ekOut, "none") {
		t.Fatalf("device-agent ek said:\n%s", ekOut)
	}
	s.run(s.provBin, "ek", "add", "--data", s.data, "--label", "e2e", hex.EncodeToString(hash[:]))
	if out := s.run(s.agBin, enrollArgs...); !strings.Contains(out, "TPM-bound") {
		t.Fatalf("enroll after ek add: %s", out)
	}
}

// TestTPMSimulatorEndToEnd: the same flow with the in-process TPM
// simulator and the agent as a library (as the fleet simulator runs it):
// attested enrollment (EK on the allowlist), a TPM-signed mTLS handshake
// with a gateway that requires TPM-bound devices, fkx1 signed by the TPM,
// telemetry.
func TestTPMSimulatorEndToEnd(t *testing.T) {
	d, err := tpm.Open("sim")
	if err != nil {
		t.Fatal(err)
	}
	ek, err := d.EK()
	d.Close()
	if err != nil {
		t.Fatal(err)
	}
	spki, _ := x509.MarshalPKIXPublicKey(ek.Key)
	hash := sha256.Sum256(spki)
	s := newStackWith(t, "ek_allowlist: ["+hex.EncodeToString(hash[:])+"]\n", "require_tpm: true\n")
	token, _, _ := strings.Cut(s.run(s.provBin, "token", "create", "--data", s.data, "--prefix", "sim-", "--max-uses", "1", "--expires", "1h", "--require-tpm"), "\n")
	bundle, _ := pkidir.LoadBundle(s.pki)
	st := &agent.State{Dir: filepath.Join(s.dir, "sim-0001")}
	leaf, err := st.Enroll(t.Context(), agent.EnrollOptions{Provisioning: s.provURL, RootCAs: bundle.RootPool(), Token: token, ID: "sim-0001", TPM: "sim"})
	if err != nil {
		t.Fatal(err)
	}
	if _, bound, _ := authority.TPMBinding(leaf); !bound {
		t.Fatal("the certificate is not TPM-bound")
	}
	got := make(chan string, 10)
	s.service(got)
	a, err := agent.New(agent.Config{State: st, Gateway: s.gwAddr})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	for i := 1; i <= 5; i++ {
		if _, err := a.Publish(ctx, "telemetry", []byte(fmt.Sprintf(`{"sim":%d}`, i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 5; i++ {
		select {
		case <-got:
		case <-time.After(30 * time.Second):
			t.Fatalf("%d of 5 records reached the service", i)
		}
	}
	if a.Stats().Handshakes.Load() < 1 {
		t.Fatal("no fkx1 handshake")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	s.checkSink("sim-0001", records("sim", 5))
}
