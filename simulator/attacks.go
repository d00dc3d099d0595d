package simulator

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"fleetkey.dev/certs/authority"
	"fleetkey.dev/certs/identity"
	"fleetkey.dev/device-agent/agent"
)

// Attacks are tries to get past the stack from outside the fleet's rules.
// Each try must be refused, by the expected reason where the gateway's
// counters can be read, and nothing an attacker sends may reach a service.
var attackNames = []string{"expired-cert", "revoked-cert", "wrong-ca", "spoofed-client-id", "acl-publish", "acl-subscribe", "replayed-envelope", "tampered-envelope"}

// Attack is one scenario, tried Tries times At into the run.
type Attack struct {
	Name  string
	At    time.Duration
	Tries int
}

// AttackResult is what an attack got.
type AttackResult struct {
	Name    string `json:"name"`
	Tries   int64  `json:"tries"`
	Refused int64  `json:"refused"`
	Leaked  int64  `json:"leaked"`
	// Seen are the refusals as the attacker saw them; Gateway the
	// gateway's own refusal counts that moved (stage/reason), when they
	// can be read.
	Seen    map[string]int64 `json:"seen"`
	Gateway map[string]int64 `json:"gateway,omitempty"`
	Expect  string           `json:"expect"`
	OK      bool             `json:"ok"`
	Verdict string           `json:"verdict"`
}

// AttackEnv is what attacks need from the stack.
type AttackEnv struct {
	// Issuer mints attacker identities from the fleet CA (valid ones, for
	// the attacks that start as a genuine device; expired ones).
	Issuer *authority.Issuer
	// Revoke revokes a device through the provisioning service; Enroll
	// enrolls one over EST (a revoked certificate must be one the service
	// issued; default: through RunConfig's provisioning and token). Without
	// them the revoked-cert attack cannot run.
	Revoke Revoker
	Enroll func(ctx context.Context, id string) (*agent.Credentials, error)
	// Refusals reads the gateway's refusal counters (stage, reason): in
	// process (LocalStack.Refusals) or from its metrics (ScrapeRefusals).
	// Nil when there is no way to read them; an attack's verdict then
	// rests on what the attacker saw alone.
	Refusals func() (map[[2]string]int64, error)
}

// ParseAttacks parses --attack: "all" or a comma-separated list of names,
// each optionally NAME:TRIES.
func ParseAttacks(s string, at time.Duration) ([]Attack, error) {
	if s == "" {
		return nil, nil
	}
	var out []Attack
	for part := range strings.SplitSeq(s, ",") {
		name, n, hasN := strings.Cut(strings.TrimSpace(part), ":")
		tries := 3
		if hasN {
			if _, err := fmt.Sscanf(n, "%d", &tries); err != nil || tries <= 0 || tries > 1000 {
				return nil, fmt.Errorf("attack %q: tries must be 1 to 1000", part)
			}
		}
		if name == "all" {
			for _, a := range attackNames {
				out = append(out, Attack{Name: a, At: at, Tries: tries})
			}
			continue
		}
		if !slices.Contains(attackNames, name) {
			return nil, fmt.Errorf("attack %q: unknown; attacks are all, %s", name, strings.Join(attackNames, ", "))
		}
		out = append(out, Attack{Name: name, At: at, Tries: tries})
	}
	return out, nil
}

// expectations: the gateway's refusal (stage/reason) for each attack.
var attackExpect = map[string][]string{
	"expired-cert":      {"handshake/expired"},
	"revoked-cert":      {"handshake/revoked", "connect/revoked"},
	"wrong-ca":          {"handshake/unknown-ca", "handshake/invalid-chain"},
	"spoofed-client-id": {"connect/client-id-mismatch"},
	"acl-publish":       {"acl/publish"},
	"acl-subscribe":     {"acl/subscribe"},
	"replayed-envelope": {"fkx1/replay"},
	"tampered-envelope": {"fkx1/auth"},
}

type attackRun struct {
	wg      sync.WaitGroup
	mu      sync.Mutex
	results []AttackResult
	recv    *receiver
}

func runAttacks(ctx context.Context, cfg *RunConfig, f *fleet, start time.Time, recv *receiver) *attackRun {
	ar := &attackRun{recv: recv}
	if len(cfg.Attacks) == 0 {
		return ar
	}
	// One at a time: the gateway's counters then tell each attack's
	// refusals apart.
	ar.wg.Go(func() {
		for i, a := range cfg.Attacks {
			if !sleepUntil(ctx, start.Add(a.At)) {
				return
			}
			res := tryAttack(ctx, cfg, f, a, uint32(attackerIndex-1-i))
			ar.mu.Lock()
			ar.results = append(ar.results, res)
			ar.mu.Unlock()
		}
	})
	return ar
}

// wait returns the results, with leaks the receiver saw since.
func (ar *attackRun) wait() []AttackResult {
	ar.wg.Wait()
	ar.mu.Lock()
	defer ar.mu.Unlock()
	for i := range ar.results {
		r := &ar.results[i]
		if ar.recv != nil {
			// What the attacker saw get through and what reached the
			// service may be the same tries: the larger count stands.
			r.Leaked = max(r.Leaked, ar.recv.leakedBy(uint32(attackerIndex-1-i)))
		}
		r.OK = r.Leaked == 0 && r.Refused == r.Tries && r.OK
		if r.Leaked > 0 {
			r.Verdict = fmt.Sprintf("%d of %d tries got through", r.Leaked, r.Tries)
		}
	}
	return ar.results
}

// attacker is a raw MQTT-over-TLS client for attacks.
type attacker struct {
	c  *tls.Conn
	br *bufio.Reader
}

func (cfg *RunConfig) attackTLS(cert tls.Certificate) *tls.Config {
	host, _, _ := net.SplitHostPort(cfg.Gateway)
	return &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host, RootCAs: cfg.RootCAs, Certificates: []tls.Certificate{cert}}
}

// dial connects with cert and sends CONNECT as clientID; the error says
// at which stage it was refused.
func dialAttacker(ctx context.Context, cfg *RunConfig, cert tls.Certificate, clientID string) (*attacker, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	raw, err := (&net.Dialer{}).DialContext(ctx, "tcp", cfg.Gateway)
	if err != nil {
		return nil, "tcp", err
	}
	c := tls.Client(raw, cfg.attackTLS(cert))
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, "tls", err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	a := &attacker{c: c, br: bufio.NewReaderSize(c, 1024)}
	if _, err := c.Write(connectPacket(clientID, 60)); err != nil {
		c.Close()
		return nil, "connect", err
	}
	p, err := readPacket(a.br)
	if err != nil {
		c.Close()
		return nil, "connect", err
	}
	if code, err := p.connackCode(); err != nil || code != 0 {
		c.Close()
		if err == nil {
			err = errors.New(connackReason(code))
		}
		return nil, "connect", err
	}
	return a, "", nil
}

// next reads the next packet; a PUBLISH it acknowledges and hands to
// onPub first. It gives up at the deadline.
func (a *attacker) next(deadline time.Time, onPub func(topic string, payload []byte)) (packet, error) {
	_ = a.c.SetDeadline(deadline)
	p, err := readPacket(a.br)
	if err != nil || p.typ != pktPublish {
		return p, err
	}
	topic, qos, pid, payload, err := p.publish()
	if err != nil {
		return p, err
	}
	if qos == 1 {
		_, _ = a.c.Write(pubackPacket(pid))
	}
	if onPub != nil {
		onPub(topic, payload)
	}
	return p, nil
}

// publishWait publishes at QoS 1 and waits for its PUBACK; an error means
// none came (the connection closed, or 3 s passed).
func (a *attacker) publishWait(topic string, payload []byte, pid uint16) error {
	if _, err := a.c.Write(publishPacket(topic, payload, 1, pid)); err != nil {
		return err
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		p, err := a.next(deadline, nil)
		if err != nil {
			return err
		}
		if p.typ == pktPuback && len(p.body) >= 2 && binary.BigEndian.Uint16(p.body) == pid {
			return nil
		}
	}
}

// Attack bodies carry a marker where devices put their index: forged
// records (which must never be delivered) attackerIndex-1-i for the i-th
// attack, and the genuine records of attackers that then replay them
// that marker less genuineOffset.
const genuineOffset = 1 << 24

func attackBody(marker uint32, try int) []byte {
	b := make([]byte, bodyHeader+16)
	binary.BigEndian.PutUint64(b, uint64(time.Now().UnixNano()))
	binary.BigEndian.PutUint32(b[8:], marker)
	binary.BigEndian.PutUint32(b[12:], uint32(try))
	copy(b[bodyHeader:], "attack")
	return b
}

func mintTLS(iss *authority.Issuer, id string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	c, err := iss.Issue(&authority.Request{Role: identity.RoleDevice, Name: id, PublicKey: key.Public()})
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: key, Leaf: c}, nil
}

// wrongCA makes a device certificate for id from a CA no one trusts, with
// the fleet's own SPIFFE form.
func wrongCA(iss *authority.Issuer, id string) (tls.Certificate, error) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "not the fleet CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	rogue, err := authority.NewCA(caCert, caKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	return mintTLS(&authority.Issuer{CA: rogue, Policy: iss.Policy}, id)
}

// tryAttack runs one attack's tries. marker tags what it sends so the
// receiver can count leaks.
func tryAttack(ctx context.Context, cfg *RunConfig, f *fleet, a Attack, marker uint32) AttackResult {
	env := cfg.AttackEnv
	res := AttackResult{Name: a.Name, Seen: map[string]int64{}, Expect: strings.Join(attackExpect[a.Name], " or "), OK: true}
	var before map[[2]string]int64
	if env.Refusals != nil {
		var err error
		if before, err = env.Refusals(); err != nil {
			res.OK, res.Verdict = false, "could not run: "+err.Error()
			return res
		}
	}
	victim := deviceID(0)
	for i := range a.Tries {
		refused, seen, err := attackOnce(ctx, cfg, a.Name, fmt.Sprintf("sim-attacker-%s-%d", a.Name, i), victim, marker, i)
		if err != nil {
			res.OK = false
			res.Verdict = "could not run: " + err.Error()
			res.Tries = int64(i)
			return res
		}
		res.Tries++
		res.Seen[seen]++
		if refused {
			res.Refused++
		} else {
			res.Leaked++
		}
	}
	if env.Refusals != nil {
		after, err := env.Refusals()
		if err != nil {
			res.OK, res.Verdict = false, "tried, but "+err.Error()
			return res
		}
		res.Gateway = map[string]int64{}
		for k, n := range after {
			if d := n - before[k]; d > 0 {
				res.Gateway[k[0]+"/"+k[1]] = d
			}
		}
		var got int64
		for _, e := range attackExpect[a.Name] {
			got += res.Gateway[e]
		}
		if got < res.Refused {
			res.OK = false
			res.Verdict = fmt.Sprintf("the gateway counted %d refusals as %s for %d refused tries", got, res.Expect, res.Refused)
		}
	}
	if res.Verdict == "" {
		res.Verdict = fmt.Sprintf("%d of %d refused", res.Refused, res.Tries)
	}
	return res
}

// attackOnce makes one try. refused says the stack refused it; seen is how,
// as the attacker saw it.
func attackOnce(ctx context.Context, cfg *RunConfig, name, self, victim string, marker uint32, try int) (refused bool, seen string, err error) {
	env := cfg.AttackEnv
	if env.Issuer == nil {
		return false, "", errors.New("no fleet issuer to mint attacker identities (use --local or --pki)")
	}
	connectRefused := func(cert tls.Certificate, clientID string) (bool, string, error) {
		a, stage, err := dialAttacker(ctx, cfg, cert, clientID)
		if err != nil {
			if stage == "tcp" {
				return false, "", err
			}
			return true, reasonOf(stage, err), nil
		}
		a.c.Close()
		return false, "connected", nil
	}
	switch name {
	case "expired-cert":
		iss := *env.Issuer
		iss.Now = func() time.Time { return time.Now().Add(-2 * time.Hour) }
		iss.Policy.Validity = map[identity.Role]time.Duration{identity.RoleDevice: time.Hour}
		cert, err := mintTLS(&iss, self)
		if err != nil {
			return false, "", fmt.Errorf("minting an expired certificate: %w", err)
		}
		return connectRefused(cert, self)
	case "wrong-ca":
		cert, err := wrongCA(env.Issuer, self)
		if err != nil {
			return false, "", err
		}
		return connectRefused(cert, self)
	case "revoked-cert":
		if env.Enroll == nil && cfg.Provisioning != "" && cfg.Token != "" {
			env.Enroll = func(ctx context.Context, id string) (*agent.Credentials, error) {
				return enrollDevice(ctx, cfg, filepath.Join(cfg.Dir, "attackers", id), id)
			}
		}
		if env.Enroll == nil || env.Revoke == nil {
			return false, "", errors.New("needs the provisioning service and its admin API (--local)")
		}
		creds, err := env.Enroll(ctx, self)
		if err != nil {
			return false, "", fmt.Errorf("enrolling the attacker: %w", err)
		}
		if err := env.Revoke(ctx, self); err != nil {
			return false, "", fmt.Errorf("revoking the attacker: %w", err)
		}
		// The gateway learns of it from the revocation feed: allow it a
		// second, as the fleet's contract says.
		deadline := time.Now().Add(time.Second)
		for {
			ok, seen, err := connectRefused(creds.TLS(), self)
			if err != nil || ok || time.Now().After(deadline) {
				return ok, seen, err
			}
			if !sleepUntil(ctx, time.Now().Add(50*time.Millisecond)) {
				return false, "", ctx.Err()
			}
		}
	}
	cert, err := mintTLS(env.Issuer, self)
	if err != nil {
		return false, "", err
	}
	if name == "spoofed-client-id" {
		return connectRefused(cert, victim)
	}
	a, stage, err := dialAttacker(ctx, cfg, cert, self)
	if err != nil {
		return false, "", fmt.Errorf("the attacker's genuine connection failed at %s: %w", stage, err)
	}
	defer a.c.Close()
	switch name {
	case "acl-subscribe":
		if _, err := a.c.Write(subscribePacket(7, []string{"fleet/telemetry/#"}, 1)); err != nil {
			return true, reasonOf("subscribe", err), nil
		}
		p, err := a.next(time.Now().Add(3*time.Second), nil)
		if err != nil {
			return true, reasonOf("subscribe", err), nil
		}
		if p.typ == pktSuback && len(p.body) == 3 && p.body[2] == 0x80 {
			return true, "suback: failure (0x80)", nil
		}
		return false, fmt.Sprintf("suback: granted qos %v", p.body[2:]), nil
	case "acl-publish":
		// Forge a delivered record, and write on another device's topic;
		// then a PINGREQ: the broker handles a client's packets in order,
		// so its PINGRESP means both publishes were judged (and counted)
		// before the next attack starts.
		for j, topic := range []string{"fleet/telemetry/" + victim + "/" + cfg.channels[0], "devices/" + victim + "/up/" + cfg.channels[0]} {
			if _, err := a.c.Write(publishPacket(topic, attackBody(marker, try), 1, uint16(10+j))); err != nil {
				return true, reasonOf("publish", err), nil
			}
		}
		if _, err := a.c.Write(pingreqPacket); err != nil {
			return true, reasonOf("publish", err), nil
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			p, err := a.next(deadline, nil)
			if err != nil {
				return true, reasonOf("publish", err), nil
			}
			if p.typ == pktPingresp {
				// 3.1.1 has no refusal code: whether anything got through
				// is the receiver's leak count.
				return true, "publish: not delivered (leaks counted at the receiver)", nil
			}
		}
	}
	// replayed- and tampered-envelope: a genuine device with session keys.
	dev := agent.NewDevice(self, agent.DeviceOptions{Suite: cfg.Suite})
	var pid uint16 = 100
	send := func(topic string, payload []byte) error {
		pid++
		_, err := a.c.Write(publishPacket(topic, payload, 1, pid))
		return err
	}
	creds := &agent.Credentials{Signer: cert.PrivateKey.(*ecdsa.PrivateKey), Leaf: cert.Leaf, Bundle: cfg.Bundle}
	link, err := dev.NewLink(creds, send)
	if err != nil {
		return false, "", err
	}
	if _, err := a.c.Write(subscribePacket(1, dev.Subscriptions(), 1)); err != nil {
		return false, "", err
	}
	if err := link.Start(); err != nil {
		return false, "", err
	}
	deadline := time.Now().Add(10 * time.Second)
	for !link.Ready() {
		if _, err := a.next(deadline, func(t string, p []byte) { _ = link.Handle(t, p) }); err != nil {
			return false, "", fmt.Errorf("the attacker's fkx1 handshake (%d answers refused): %w", dev.Stats.KexRefused.Load(), err)
		}
	}
	env1, err := link.Seal(cfg.channels[0], uint64(time.Now().UnixMicro()), uint64(time.Now().UnixMilli()), attackBody(marker-genuineOffset, try))
	if err != nil {
		return false, "", err
	}
	if err := a.publishWait(dev.Topic("up/"+cfg.channels[0]), env1, 200); err != nil {
		return false, "", fmt.Errorf("the attacker's genuine record was not acknowledged: %v", err)
	}
	if name == "replayed-envelope" {
		if err := a.publishWait(dev.Topic("up/"+cfg.channels[0]), env1, 201); err != nil {
			return true, reasonOf("replay", err), nil
		}
		// Whether it was delivered again is the receiver's leak count.
		return true, "puback: acknowledged as a duplicate, not delivered again", nil
	}
	// A fresh envelope (an unused seq: a replayed one is caught before
	// its tag is checked), one bit of its tag flipped.
	bad, err := link.Seal(cfg.channels[0], uint64(time.Now().UnixMicro()), uint64(time.Now().UnixMilli()), attackBody(marker, try))
	if err != nil {
		return false, "", err
	}
	bad[len(bad)-1] ^= 0x01
	if err := a.publishWait(dev.Topic("up/"+cfg.channels[0]), bad, 202); err != nil {
		return true, reasonOf("tampered", err), nil
	}
	return false, "puback: a tampered envelope was acknowledged", nil
}

// AttackNames are the attacks --attack knows.
func AttackNames() []string { return slices.Clone(attackNames) }
