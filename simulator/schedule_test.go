package simulator

import (
	"testing"
	"time"
)

func TestSchedules(t *testing.T) {
	c, _ := ParseSchedule("constant", 10)
	if c(0) != 0 || c(10) != time.Second {
		t.Fatalf("constant: %v %v", c(0), c(10))
	}
	// ramp over 10 s to 10/s: 50 arrivals during the ramp, the 50th at 10 s.
	r, _ := ParseSchedule("ramp:10s", 10)
	if d := r(50); d != 10*time.Second {
		t.Fatalf("ramp: the 50th at %v", d)
	}
	if d := r(60); d != 11*time.Second {
		t.Fatalf("ramp: the 60th at %v", d)
	}
	for i := 1; i < 100; i++ {
		if r(i) < r(i-1) {
			t.Fatal("ramp goes back in time")
		}
	}
	b, _ := ParseSchedule("burst:5/2s", 1)
	if b(4) != 0 || b(5) != 2*time.Second {
		t.Fatalf("burst: %v %v", b(4), b(5))
	}
	p, _ := ParseSchedule("poisson", 100)
	if d := p(999); d < 8*time.Second || d > 12*time.Second {
		t.Fatalf("poisson: 1,000 arrivals at 100/s took %v", d)
	}
	for _, bad := range []string{"ramp", "ramp:x", "burst:5", "burst:0/1s", "wave"} {
		if _, err := ParseSchedule(bad, 10); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
