package bench

import (
	"context"
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

// TestFarmTiny runs the farm simulation on a token load and checks its
// counts: in direct mode each job costs exactly two etcd writes (its
// reference's put and delete); through the agents, only a host's first
// job on a package writes, since the linger outlasts the run.
func TestFarmTiny(t *testing.T) {
	cfg := DefaultFarm()
	cfg.Hosts, cfg.Packages, cfg.HostRate, cfg.Hold = []int{3}, 5, 70, time.Millisecond
	cfg.Linger, cfg.Warm, cfg.DirectWarm, cfg.Duration = time.Hour, 50*time.Millisecond, 50*time.Millisecond, 300*time.Millisecond
	cfg.MaxRate = map[string]float64{FarmDirect: 100}
	cfg.Dir = t.TempDir()
	res, err := Farm(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != len(cfg.Modes) {
		t.Fatalf("%d results, want one per mode (%v)", len(res), cfg.Modes)
	}
	byMode := map[string]FarmResult{}
	for _, r := range res {
		t.Log(r)
		byMode[r.Mode] = r
		if r.Jobs < 1 || r.Hosts != 3 {
			t.Errorf("%s: %d jobs on %d hosts, want some on 3", r.Mode, r.Jobs, r.Hosts)
		}
	}
	direct := byMode[FarmDirect]
	if direct.WritesPerJob != 2 || !direct.Steady {
		t.Errorf("direct mode: %v etcd writes per job (steady %v), want 2 (a reference's put and delete)", direct.WritesPerJob, direct.Steady)
	}
	if !direct.Capped || direct.HostRate != 100.0/3 {
		t.Errorf("direct mode: capped %v at %v jobs/s per host, want capped at 100/3", direct.Capped, direct.HostRate)
	}
	for _, m := range []string{FarmAgent, FarmInProcess} {
		r := byMode[m]
		// 3 hosts × 5 packages at most, and never more than direct.
		if w := r.WritesPerJob * float64(r.Jobs); w > 15 || r.WritesPerJob > direct.WritesPerJob {
			t.Errorf("%s: %v etcd writes over %d jobs, want at most one per host and package", m, w, r.Jobs)
		}
		if r.Steady || r.Capped {
			t.Errorf("%s: steady %v, capped %v; want false, false (warm-up < linger; no cap)", m, r.Steady, r.Capped)
		}
	}
}

func TestFarmPredictedWrites(t *testing.T) {
	tests := []struct {
		name           string
		packages       int
		s, rate        float64
		linger, hold   time.Duration
		want, tolerant float64
	}{
		{"no linger, no hold: every job takes and releases", 100, 1.1, 10, 0, 0, 2, 1e-12},
		{"one package: 2·exp(−r·(L+hold))", 1, 1.1, 2, time.Second, 500 * time.Millisecond, 2 * math.Exp(-3), 1e-12},
		{"warm for ever", 100, 1.1, 1000, time.Hour, 0, 0, 1e-9},
		// The figures docs/benchmarks.md quotes for P = 100, s = 1.1.
		{"r·L = 500", 100, 1.1, 100, 5 * time.Second, 0, 0.0988, 1e-4},
		{"r·L = 2,000", 100, 1.1, 20, 100 * time.Second, 0, 0.0039, 1e-4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := FarmPredictedWrites(tt.packages, tt.s, tt.rate, tt.linger, tt.hold)
			if math.Abs(got-tt.want) > tt.tolerant {
				t.Errorf("FarmPredictedWrites = %v, want %v", got, tt.want)
			}
		})
	}
}

// instantHost holds nothing and answers at once: what is timed is the
// job generator alone.
type instantHost struct{}

func (instantHost) acquire(context.Context, string) (func(context.Context) error, error) {
	return func(context.Context) error { return nil }, nil
}
func (instantHost) prewarm(context.Context, string) error { return nil }

// The generator starts jobs up to a millisecond ahead of their arrival
// rather than sleeping for less; such a job's start time must count from
// its start, never come out negative (it did, at 10,000 jobs/s on a fast
// machine: p50 -0.23 ms).
func TestFarmJobStartsNotNegative(t *testing.T) {
	cfg := DefaultFarm()
	cfg.Packages, cfg.Hold = 10, 0
	f := &farm{cfg: cfg}
	st, err := f.jobs(context.Background(), []farmHost{instantHost{}}, rand.New(rand.NewPCG(1, 1)), 20000, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if st.jobs < 1000 {
		t.Fatalf("%d jobs; want thousands", st.jobs)
	}
	for _, d := range st.starts {
		if d < 0 {
			t.Fatalf("a job start of %v: timed from before the job started", d)
		}
	}
}
