package simulator

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"time"
)

// Schedule gives each device its intended start, as an offset from the
// run's start: an open model, so a slow system does not slow the arrivals.
type Schedule func(i int) time.Duration

// ParseSchedule reads --schedule:
//
//	constant            rate devices a second (the default)
//	ramp:D              from 0 up to rate over D, then constant
//	burst:N/P           N devices at once every P (rate is unused)
//	poisson             exponential gaps with mean 1/rate (seeded, so
//	                    runs repeat)
func ParseSchedule(spec string, rate float64) (Schedule, error) {
	if rate <= 0 {
		return nil, fmt.Errorf("the rate must be positive")
	}
	kind, arg, _ := strings.Cut(spec, ":")
	switch kind {
	case "", "constant":
		return func(i int) time.Duration { return time.Duration(float64(i) / rate * float64(time.Second)) }, nil
	case "ramp":
		r, err := time.ParseDuration(arg)
		if err != nil || r <= 0 {
			return nil, fmt.Errorf("--schedule ramp:D: %q is not a duration like 30s", arg)
		}
		R := r.Seconds()
		rampN := rate * R / 2 // arrivals during the ramp
		return func(i int) time.Duration {
			n := float64(i)
			if n <= rampN {
				return time.Duration(math.Sqrt(2*R*n/rate) * float64(time.Second))
			}
			return time.Duration((R + (n-rampN)/rate) * float64(time.Second))
		}, nil
	case "burst":
		ns, ps, ok := strings.Cut(arg, "/")
		var n int
		_, err := fmt.Sscanf(ns, "%d", &n)
		p, perr := time.ParseDuration(ps)
		if !ok || err != nil || perr != nil || n <= 0 || p <= 0 {
			return nil, fmt.Errorf("--schedule burst:N/P: want a count and a period, like burst:500/10s")
		}
		return func(i int) time.Duration { return time.Duration(i/n) * p }, nil
	case "poisson":
		rng := rand.New(rand.NewPCG(1, 2))
		var at []time.Duration
		var t float64
		return func(i int) time.Duration {
			for len(at) <= i {
				t += rng.ExpFloat64() / rate
				at = append(at, time.Duration(t*float64(time.Second)))
			}
			return at[i]
		}, nil
	}
	return nil, fmt.Errorf("--schedule %q: want constant, ramp:D, burst:N/P or poisson", spec)
}
