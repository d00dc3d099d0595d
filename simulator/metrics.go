package simulator

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// refusalsMetric is the gateway's counter of refusals by stage and reason.
const refusalsMetric = "fleetkey_gateway_refusals_total"

// maxMetricsBody bounds what a scrape reads.
const maxMetricsBody = 8 << 20

// ScrapeRefusals reads a gateway's refusal counters from its metrics
// endpoint (url: http://HOST:9102/metrics), for attack verdicts against a
// gateway in another process (AttackEnv.Refusals).
func ScrapeRefusals(url string) func() (map[[2]string]int64, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	return func() (map[[2]string]int64, error) {
		resp, err := client.Get(url)
		if err != nil {
			return nil, fmt.Errorf("reading the gateway's metrics: %w", err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("reading the gateway's metrics: %s answered %s", url, resp.Status)
		}
		return parseRefusals(io.LimitReader(resp.Body, maxMetricsBody))
	}
}

// parseRefusals takes the refusal counters out of a Prometheus text
// exposition.
func parseRefusals(r io.Reader) (map[[2]string]int64, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("the gateway's metrics: %w", err)
	}
	out := map[[2]string]int64{}
	fam, ok := fams[refusalsMetric]
	if !ok {
		// A gateway that has refused nothing yet has no such series.
		for name := range fams {
			if strings.HasPrefix(name, "fleetkey_gateway_") {
				return out, nil
			}
		}
		return nil, fmt.Errorf("the metrics have no fleetkey_gateway_ series: is this a fleetkey gateway's /metrics?")
	}
	for _, m := range fam.GetMetric() {
		var stage, reason string
		for _, l := range m.GetLabel() {
			switch l.GetName() {
			case "stage":
				stage = l.GetValue()
			case "reason":
				reason = l.GetValue()
			}
		}
		out[[2]string{stage, reason}] = int64(m.GetCounter().GetValue())
	}
	return out, nil
}
