package simulator

import (
	"strings"
	"testing"
)

func TestSLOs(t *testing.T) {
	slos, err := ParseSLOs("ready_p99<2s, loss=0,errors<=1,unconnected=0")
	if err != nil {
		t.Fatal(err)
	}
	good := &Summary{Devices: 10, Connected: 10, ReadyP99MS: 1500}
	if missed := Check(good, slos); len(missed) != 0 {
		t.Fatalf("a good run missed %v", missed)
	}
	bad := &Summary{Devices: 10, Connected: 9, ReadyP99MS: 2500, Lost: 3, Errors: map[string]int64{"a": 1, "b": 1}}
	missed := Check(bad, slos)
	if len(missed) != 4 || !strings.Contains(missed[0], "got 2500 ms") {
		t.Fatalf("missed %v", missed)
	}
	for spec, want := range map[string]string{
		"ready_p99":      "want METRIC<VALUE",
		"latency<2s":     "unknown metric",
		"ready_p99<fast": "not a duration",
		"loss=some":      "not a count",
		"loss=-1":        "not a count",
	} {
		if _, err := ParseSLOs(spec); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v; want %q", spec, err, want)
		}
	}
}
