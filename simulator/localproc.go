package simulator

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"

	"go.yaml.in/yaml/v3"

	"fleetkey.dev/simulator/peers"
)

// The local stack as child processes (LocalOptions.Bin): the provisioning
// and gateway binaries, each `serve` with its own flags or config file,
// their logs in the state directory. The Stack's API is the same; the
// gateway's refusal counters come from its metrics endpoint.

// startProvisioningProcess runs `provisioning serve` on a free port.
func (s *Stack) startProvisioningProcess() error {
	bin, err := s.binary("provisioning")
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(s.Dir, "provisioning.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, "serve", "--pki", s.PKI, "--data", filepath.Join(s.Dir, "provisioning"),
		"--listen", "127.0.0.1:0", "--metrics-listen", "off", "--addr-file", filepath.Join(s.Dir, "provisioning.addr"))
	cmd.Stderr = logf
	p, err := peers.StartProcess(s.ctx, "provisioning", filepath.Join(s.Dir, "provisioning.addr"), cmd)
	logf.Close() // the child has its own descriptor
	if err != nil {
		return fmt.Errorf("%w (its log: %s)", err, logf.Name())
	}
	_, port, _ := net.SplitHostPort(p.Addr)
	s.Provisioning = "https://localhost:" + port
	cancelCtx := s.cancel
	stop, done := stopper(p)
	s.cancel, s.done = func() { stop(); cancelCtx() }, done
	return nil
}

// startProcesses starts provisioning, then the gateway following it, as
// child processes.
func (s *Stack) startProcesses(admin tls.Certificate) error {
	if err := s.startProvisioningProcess(); err != nil {
		return err
	}
	s.Admin = NewAdmin(s.Provisioning, s.RootCAs, admin)
	addr, err := freePort()
	if err != nil {
		return err
	}
	metrics, err := freePort()
	if err != nil {
		return err
	}
	if err := s.startGatewayProcess(addr, metrics); err != nil {
		s.cancel()
		<-s.done
		return err
	}
	_, port, _ := net.SplitHostPort(addr)
	s.Gateway = "localhost:" + port
	s.setMetrics(metrics)
	return nil
}

// gatewayConfig is the gateway's config file in process mode: the keys of
// gateway/server.Config that the local stack sets.
type gatewayConfig struct {
	Listen               string `yaml:"listen"`
	MetricsListen        string `yaml:"metrics_listen"`
	PKIDir               string `yaml:"pki_dir"`
	Provisioning         string `yaml:"provisioning"`
	TelemetrySink        string `yaml:"telemetry_sink"`
	ConnPerSecondPerAddr int    `yaml:"conn_per_second_per_addr"`
	PlaintextTelemetry   bool   `yaml:"plaintext_telemetry"`
	RequireTPM           bool   `yaml:"require_tpm"`
}

// startGatewayProcess runs `gateway serve --config` on addr, its metrics
// on metrics (both host:port, fixed so that a restart keeps them).
func (s *Stack) startGatewayProcess(addr, metrics string) error {
	bin, err := s.binary("gateway")
	if err != nil {
		return err
	}
	conf := filepath.Join(s.Dir, "gateway.yaml")
	b, err := yaml.Marshal(gatewayConfig{Listen: addr, MetricsListen: metrics, PKIDir: s.PKI, Provisioning: s.Provisioning, TelemetrySink: s.Sink,
		ConnPerSecondPerAddr: s.opts.ConnPerSecondPerAddr, PlaintextTelemetry: s.opts.PlaintextTelemetry, RequireTPM: s.opts.RequireTPM})
	if err != nil {
		return err
	}
	if err := os.WriteFile(conf, b, 0o600); err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(s.Dir, "gateway.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, "serve", "--config", conf, "--addr-file", filepath.Join(s.Dir, "gateway.addr"))
	cmd.Stderr = logf
	p, err := peers.StartProcess(s.ctx, "gateway", filepath.Join(s.Dir, "gateway.addr"), cmd)
	logf.Close()
	if err != nil {
		return fmt.Errorf("%w (its log: %s)", err, logf.Name())
	}
	s.cancelGW, s.gwDone = stopper(p)
	return nil
}

// stopper makes a child's stop look like an in-process server's: stop
// asks it to (SIGTERM, once), and done gets Stop's result.
func stopper(p *peers.Peer) (stop func(), done chan error) {
	done = make(chan error, 1)
	var once sync.Once
	return func() { once.Do(func() { go func() { done <- p.Stop() }() }) }, done
}

// binary is the path of one of the stack's binaries in LocalOptions.Bin.
func (s *Stack) binary(name string) (string, error) {
	p := filepath.Join(s.opts.Bin, name)
	if fi, err := os.Stat(p); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		return "", fmt.Errorf("no %s binary at %s (make build puts it in bin/)", name, p)
	}
	return p, nil
}

// freePort finds a free loopback port below the ephemeral range, for a
// child to listen on (and listen on again after a restart).
func freePort() (string, error) {
	ln, err := listenBelowEphemeral()
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		return "", errors.Join(err, fmt.Errorf("freeing %s", addr))
	}
	return addr, nil
}
