#!/usr/bin/env bash
# make run: a fresh fleet PKI, then the provisioning service on it, and one
# device enrolled through EST with openssl and curl, as a factory station
# would; then the gateway, and a second device run by the device agent:
# enrolled over EST, connected over mTLS, fkx1 session keys, 20 encrypted
# records into the gateway's sink. Grows into the whole-fleet demo
# (simulator) in issue 7.
set -euo pipefail
cd "$(dirname "$0")/.."
state=${STATE:-.fleetkey}
td=${TRUST_DOMAIN:-fleet.local}
pki=$state/pki
data=$state/provisioning
work=$state/demo

for tool in openssl curl mkfifo; do
	command -v "$tool" >/dev/null || { echo "make run uses $tool as the device's EST client; install it (apt-get install openssl curl)" >&2; exit 1; }
done
rm -rf "$pki" "$data" "$work" "$state/sim"
mkdir -p "$work"
bin/certs init --dir "$pki" --trust-domain "$td"
echo
bin/certs inspect "$pki/gateway.crt"
echo
openssl verify -CAfile "$pki/root.crt" -untrusted "$pki/issuing.crt" "$pki/gateway.crt" "$pki/admin.crt" "$pki/service.crt"
echo

token=$(bin/provisioning token create --data "$data" --prefix demo- --max-uses 10 --expires 1h)
rm -f "$work/addr"
mkfifo "$work/addr"
bin/provisioning serve --pki "$pki" --data "$data" --listen 127.0.0.1:0 --metrics-listen off --addr-file "$work/addr" 2>"$work/provisioning.log" &
pid=$!
gwpid=
trap 'kill $pid $gwpid 2>/dev/null || true; wait $pid $gwpid 2>/dev/null || true' EXIT
addr=$(cat "$work/addr")
port=${addr##*:}
echo "provisioning service on https://localhost:$port (log: $work/provisioning.log)"

echo "enrolling demo-0001 with openssl + curl (EST simpleenroll)..."
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/demo-0001.key" \
	-subj /CN=demo-0001 -outform DER -out "$work/demo-0001.csr" 2>/dev/null
openssl base64 -in "$work/demo-0001.csr" -out "$work/demo-0001.csr.b64"
curl -sS --fail-with-body --cacert "$pki/root.crt" -H "Authorization: Bearer $token" \
	-H 'Content-Type: application/pkcs10' --data-binary @"$work/demo-0001.csr.b64" \
	-o "$work/demo-0001.p7.b64" "https://localhost:$port/.well-known/est/simpleenroll"
openssl base64 -d -in "$work/demo-0001.p7.b64" | openssl pkcs7 -inform DER -print_certs -out "$work/demo-0001.crt"
openssl verify -CAfile "$pki/root.crt" -untrusted "$pki/issuing.crt" "$work/demo-0001.crt"
bin/certs inspect --bundle "$pki/bundle.pem" "$work/demo-0001.crt" | sed -n '1,4p'
echo
bin/provisioning device list --data "$data"
echo
echo "PKI in $pki, registry in $data, the demo device's key and certificate in $work."
echo

echo "starting the gateway, and enrolling demo-0002 with the device agent..."
sink=$state/telemetry.jsonl
rm -f "$work/gw.addr" "$sink"
mkfifo "$work/gw.addr"
bin/gateway serve --pki "$pki" --provisioning "https://localhost:$port" --listen 127.0.0.1:0 --metrics-listen off \
	--telemetry-sink "$sink" --addr-file "$work/gw.addr" 2>"$work/gateway.log" &
gwpid=$!
gwaddr=$(cat "$work/gw.addr")
echo "gateway on $gwaddr (MQTT over TLS; log: $work/gateway.log)"
bin/device-agent enroll --provisioning "https://localhost:$port" --ca "$pki/root.crt" --token "$token" \
	--id demo-0002 --dir "$work/demo-0002"
for i in $(seq 1 20); do echo "{\"reading\":$i,\"temp_c\":2$((i % 10)).5}"; done >"$work/readings.txt"
bin/device-agent run --dir "$work/demo-0002" --gateway "$gwaddr" --source "file:$work/readings.txt" \
	--exit-when-done 2>"$work/agent.log"
echo
bin/device-agent status --dir "$work/demo-0002"
echo
echo "the gateway decrypted and stored (fsync'd before each PUBACK) in $sink:"
head -3 "$sink"
echo "... $(wc -l <"$sink") records"
kill $pid $gwpid 2>/dev/null || true
wait $pid $gwpid 2>/dev/null || true
pid= gwpid=
echo

echo "now a fleet: 100 virtual devices, each enrolled over EST and running the device agent's"
echo "fkx1 code, on a stack of its own, for 60 s of encrypted telemetry, rekeying every 20 s,"
echo "while a service sends them commands and every attack in the book is tried once..."
bin/simulator run --local --dir "$state/sim" --devices 100 --rate 50 --duration 60s --interval 1s \
	--epoch-every 20s --generation-every 10s --command-rate 2 --attack all:1 \
	--slo 'connect_p99<2s,loss=0,leaks=0' --json "$state/sim/summary.json" --report "$state/sim/report.html"
echo "summary: $state/sim/summary.json"
echo "report:  $state/sim/report.html (opens offline in any browser)"
