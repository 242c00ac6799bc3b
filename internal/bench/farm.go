package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// FarmConfig is a farm simulation: for each host count H in Hosts, H
// simulated hosts in one process each start jobs at HostRate per second
// (Poisson arrivals: HostRate×H per second in total, each on a host drawn
// uniformly), each job holding one of Packages published packages (drawn
// with Zipf popularity as rand.NewZipf draws it: p(k) ∝ (1+k)^−ZipfS) for
// Hold, against a 3-member embedded etcd cluster with fsync on. Each host
// count runs in every mode of Modes (see FarmModes). A warm-up of Warm
// precedes the measured Duration.
//
// The agent modes are in steady state only once Warm ≥ Linger + Hold:
// before that, packages taken early have not had the chance to expire, so
// the measured window would miss their releases and count too many first
// takes. Results say whether they were.
type FarmConfig struct {
	Hosts    []int         `json:"hosts"`
	Modes    []string      `json:"modes"`
	HostRate float64       `json:"host_rate"` // job starts per second per host
	Packages int           `json:"packages"`
	ZipfS    float64       `json:"zipf_s"`
	Hold     time.Duration `json:"hold_ns"`
	Linger   time.Duration `json:"linger_ns"` // the agents' linger; 0: none
	// Warm is the warm-up of the agent modes; 0: Linger + Hold + 5 s, the
	// shortest that reaches steady state, with a margin for the prewarmed
	// references that expire together at the end of the first linger.
	Warm time.Duration `json:"warm_ns"`
	// DirectWarm is the warm-up of the direct mode, which has no linger to
	// wait out.
	DirectWarm time.Duration `json:"direct_warm_ns"`
	Duration   time.Duration `json:"duration_ns"`
	// MaxRate caps a mode's total job rate (jobs/s over all hosts) where
	// each job costs the simulation real I/O (direct: two etcd writes;
	// agent: a unix-socket connection), so that it does not pile up
	// faster than this machine can serve; a capped mode runs at
	// MaxRate/H per host and its results say so. No entry: no cap.
	MaxRate  map[string]float64 `json:"max_rate"`
	Dir      string             `json:"-"` // where the shared root is made; empty: os.TempDir()
	Progress io.Writer          `json:"-"` // one line per step; nil discards
}

// Farm modes.
const (
	// FarmDirect: each job takes its own etcd reference on its host's
	// store, as a process with its own store does.
	FarmDirect = "direct"
	// FarmAgent: each host runs the node's local API (node.LocalAPI, the
	// code `granary serve` runs) on a unix socket; each job connects
	// (agent.Connect), takes and drops its reference, and closes, as
	// `granary run` does through the node.
	FarmAgent = "agent"
	// FarmInProcess: the same node code per host, the jobs taking their
	// references in process (node.LocalAPI.LocalRefs) instead of through
	// the socket: what the agent's aggregation costs etcd, at rates the
	// socket path cannot reach on one small machine.
	FarmInProcess = "agent-inproc"
)

// FarmModes are the modes Farm knows, in the order it runs them.
func FarmModes() []string { return []string{FarmDirect, FarmAgent, FarmInProcess} }

// DefaultFarm is the published farm simulation (docs/benchmarks.md): 10
// job starts per second per host over 100 packages (Zipf s = 1.1), each
// held 20 ms, with a 200 s linger (r·L = 2,000; the node's default, 10
// min, gives a host at this rate r·L = 6,000, but its warm-up alone would
// take over 10 min per host count and mode); the direct and socket agent
// modes capped at 1,000 jobs/s in total.
func DefaultFarm() FarmConfig {
	return FarmConfig{
		Hosts: []int{10, 100, 1000}, Modes: FarmModes(),
		HostRate: 10, Packages: 100, ZipfS: 1.1, Hold: 20 * time.Millisecond,
		Linger: 200 * time.Second, DirectWarm: 2 * time.Second, Duration: 30 * time.Second,
		MaxRate: map[string]float64{FarmDirect: 1000, FarmAgent: 1000},
	}
}

// FarmResult is one host count in one mode.
type FarmResult struct {
	Hosts    int     `json:"hosts"`
	Mode     string  `json:"mode"`
	HostRate float64 `json:"host_rate"` // job starts per second per host, as run (after the cap)
	Capped   bool    `json:"capped"`    // HostRate was lowered to the mode's MaxRate
	LingerS  float64 `json:"linger_s"`  // 0 in direct mode
	WarmS    float64 `json:"warm_s"`
	// Steady: the warm-up covered the linger and hold, so the writes per
	// job are the steady state's (always true in direct mode).
	Steady          bool    `json:"steady"`
	DurationS       float64 `json:"duration_s"`
	Jobs            int     `json:"jobs"`
	JobsPerS        float64 `json:"jobs_per_s"` // achieved
	Writes          int64   `json:"writes"`
	WritesPerS      float64 `json:"writes_per_s"`
	WritesPerJob    float64 `json:"writes_per_job"`
	RevisionsPerJob float64 `json:"revisions_per_job"`
	// Predicted is the steady state's writes per job for this HostRate,
	// Linger, Hold and popularity (FarmPredictedWrites); 2 in direct mode.
	Predicted  float64 `json:"predicted_writes_per_job"`
	StartP50MS float64 `json:"start_p50_ms"`
	StartP99MS float64 `json:"start_p99_ms"`
	StartMaxMS float64 `json:"start_max_ms"`
}

// FarmPredictedWrites is the steady state's etcd writes per job start
// through host agents: a host's job on package k is a first take (one
// write, and one more when the linger ends) iff the host started no job
// on k in the hold + linger before it, so with Poisson arrivals at rate
// per host
//
//	writes/job = Σₖ pₖ · 2 · exp(−pₖ · rate · (linger + hold))
//
// with pₖ ∝ (1+k)^−s, k = 0…packages−1 (rand.NewZipf's distribution). It
// depends on rate × linger and on the popularity's tail, not on the
// number of hosts.
func FarmPredictedWrites(packages int, s, rate float64, linger, hold time.Duration) float64 {
	var sum float64
	w := make([]float64, packages)
	for k := range w {
		w[k] = math.Pow(1+float64(k), -s)
		sum += w[k]
	}
	x := rate * (linger + hold).Seconds()
	var out float64
	for _, wk := range w {
		p := wk / sum
		out += p * 2 * math.Exp(-p*x)
	}
	return out
}

// farmHost is one simulated host: how a job on it takes a package.
type farmHost interface {
	acquire(ctx context.Context, id string) (release func(context.Context) error, err error)
	// prewarm leaves the host holding id as a job that just ended would
	// (lingering); a no-op where nothing lingers.
	prewarm(ctx context.Context, id string) error
}

// farmHosts makes the n hosts of one mode on the farm's shared etcd
// client and current root.
type farmHosts func(ctx context.Context, f *farm, n int) ([]farmHost, error)

var farmModeHosts = map[string]farmHosts{
	FarmDirect: directHosts, FarmAgent: agentHosts, FarmInProcess: inProcessHosts,
}

type farm struct {
	cfg    FarmConfig
	cl     *etcdtest.Cluster
	cnt    *Counter
	cli    *clientv3.Client
	base   string // the temporary directory holding every run's root
	root   string // the current run's shared root (a root is bound to one prefix)
	prefix string
	closes []func() error
}

// Farm runs the simulation: every host count in every mode.
func Farm(ctx context.Context, cfg FarmConfig) (res []FarmResult, err error) {
	if cfg.Packages <= 0 || cfg.HostRate <= 0 || cfg.Duration <= 0 || cfg.ZipfS <= 1 || len(cfg.Hosts) == 0 || cfg.Linger < 0 || cfg.Hold < 0 {
		return nil, errors.New("bench: farm needs packages, a rate per host, a duration, hosts, a Zipf exponent > 1 and no negative times")
	}
	for _, m := range cfg.Modes {
		if farmModeHosts[m] == nil {
			return nil, fmt.Errorf("bench: farm: unknown mode %q (known: %v)", m, FarmModes())
		}
	}
	if cfg.Warm == 0 {
		cfg.Warm = cfg.Linger + cfg.Hold + 5*time.Second
	}
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	f := &farm{cfg: cfg, cnt: &Counter{}}
	fmt.Fprintf(cfg.Progress, "farm: starting a 3-member etcd cluster\n")
	if f.cl, err = etcdtest.StartClusterServers(3, true); err != nil {
		return nil, err
	}
	defer f.cl.Close()
	f.cli, err = clientv3.New(clientv3.Config{
		Endpoints: f.cl.Endpoints, DialTimeout: 5 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(f.cnt.interceptor)},
	})
	if err != nil {
		return nil, err
	}
	defer f.cli.Close()
	if f.base, err = os.MkdirTemp(cfg.Dir, "granary-farm-"); err != nil {
		return nil, err
	}
	defer etcdstore.RemoveTree(f.base)
	for _, h := range cfg.Hosts {
		for _, m := range cfg.Modes {
			r, err := f.runMode(ctx, m, h)
			if err != nil {
				return res, fmt.Errorf("bench: farm %s at %d hosts: %w", m, h, err)
			}
			res = append(res, r)
		}
	}
	return res, nil
}

// runMode publishes the packages under a fresh prefix, makes the hosts,
// warms up and measures.
func (f *farm) runMode(ctx context.Context, mode string, n int) (r FarmResult, err error) {
	f.prefix = fmt.Sprintf("/granary-farm-%s-%d/", mode, n)
	f.root = filepath.Join(f.base, fmt.Sprintf("%s-%d", mode, n))
	defer func() { err = errors.Join(err, f.closeAll()) }()
	if err := f.publish(ctx); err != nil {
		return r, err
	}
	r = FarmResult{Hosts: n, Mode: mode, HostRate: f.cfg.HostRate, DurationS: f.cfg.Duration.Seconds(),
		LingerS: f.cfg.Linger.Seconds(), WarmS: f.cfg.Warm.Seconds()}
	if max := f.cfg.MaxRate[mode]; max > 0 && r.HostRate*float64(n) > max {
		r.HostRate, r.Capped = max/float64(n), true
	}
	warm := f.cfg.Warm
	if mode == FarmDirect {
		warm, r.LingerS, r.WarmS = f.cfg.DirectWarm, 0, f.cfg.DirectWarm.Seconds()
		r.Steady, r.Predicted = true, 2
	} else {
		r.Steady = f.cfg.Warm >= f.cfg.Linger+f.cfg.Hold
		r.Predicted = FarmPredictedWrites(f.cfg.Packages, f.cfg.ZipfS, r.HostRate, f.cfg.Linger, f.cfg.Hold)
	}
	fmt.Fprintf(f.cfg.Progress, "farm: %s, %d hosts: making the hosts\n", mode, n)
	hosts, err := farmModeHosts[mode](ctx, f, n)
	if err != nil {
		return r, err
	}
	rng := rand.New(rand.NewPCG(uint64(n), 1))
	rate := r.HostRate * float64(n)
	if mode != FarmDirect && f.cfg.Linger > 0 {
		fmt.Fprintf(f.cfg.Progress, "farm: %s, %d hosts: prewarming\n", mode, n)
		t := time.Now()
		takes, err := f.prewarm(ctx, hosts, rng, r.HostRate)
		if err != nil {
			return r, fmt.Errorf("prewarm: %w", err)
		}
		fmt.Fprintf(f.cfg.Progress, "farm: %s, %d hosts: prewarmed %d host references in %v\n", mode, n, takes, time.Since(t).Round(time.Millisecond))
	}
	fmt.Fprintf(f.cfg.Progress, "farm: %s, %d hosts: %.0f jobs/s in total (%.3g per host%s), warming up for %v\n",
		mode, n, rate, r.HostRate, map[bool]string{true: ", capped", false: ""}[r.Capped], warm)
	if _, err := f.jobs(ctx, hosts, rng, rate, warm); err != nil {
		return r, fmt.Errorf("warm-up: %w", err)
	}
	before, rev0 := f.cnt.Snapshot(), f.revision(ctx)
	st, err := f.jobs(ctx, hosts, rng, rate, f.cfg.Duration)
	if err == nil && st.jobs == 0 {
		err = errors.New("no job started (rate × duration too small)")
	}
	if err != nil {
		return r, err
	}
	c, rev1 := f.cnt.Snapshot().Sub(before), f.revision(ctx)
	r.Jobs, r.Writes = st.jobs, c.Writes
	r.JobsPerS = float64(st.jobs) / st.took.Seconds()
	r.WritesPerS = float64(c.Writes) / st.took.Seconds()
	r.WritesPerJob = float64(c.Writes) / float64(st.jobs)
	r.RevisionsPerJob = float64(rev1-rev0) / float64(st.jobs)
	slices.Sort(st.starts)
	r.StartP50MS = ms(sortedQuantile(st.starts, 0.5))
	r.StartP99MS = ms(sortedQuantile(st.starts, 0.99))
	r.StartMaxMS = ms(st.starts[len(st.starts)-1])
	fmt.Fprintf(f.cfg.Progress, "farm: %s\n", r)
	return r, nil
}

// String is the result on one line.
func (r FarmResult) String() string {
	note := ""
	if r.Capped {
		note += " (rate capped)"
	}
	if !r.Steady {
		note += " (NOT steady state: warm-up < linger + hold)"
	}
	return fmt.Sprintf("%s, %d hosts, %.3g jobs/s per host, linger %gs: %d jobs (%.0f/s), %.0f etcd writes/s, %.4f writes per job (predicted %.4f), start p50 %.2f ms p99 %.2f ms%s",
		r.Mode, r.Hosts, r.HostRate, r.LingerS, r.Jobs, r.JobsPerS, r.WritesPerS, r.WritesPerJob, r.Predicted, r.StartP50MS, r.StartP99MS, note)
}

func sortedQuantile(xs []time.Duration, q float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	return xs[min(len(xs)-1, int(q*float64(len(xs))))]
}

func (f *farm) closeAll() error {
	var errs []error
	for i := len(f.closes) - 1; i >= 0; i-- {
		errs = append(errs, f.closes[i]())
	}
	f.closes = nil
	return errors.Join(errs...)
}

// farmTTL is the simulated hosts' lease TTL: longer than a node's default,
// since a thousand hosts' keep-alives share two cores with everything else
// here, and a lease lost to a starved keep-alive would end the run.
const farmTTL = 60 * time.Second

func (f *farm) storeOptions(host string) []etcdstore.Option {
	return []etcdstore.Option{etcdstore.WithPrefix(f.prefix), etcdstore.WithHost(host), etcdstore.WithTTL(farmTTL)}
}

// publish builds the packages once, from a store of its own.
func (f *farm) publish(ctx context.Context) error {
	s, err := etcdstore.New(ctx, f.cli, f.root, f.storeOptions("publisher")...)
	if err != nil {
		return err
	}
	defer s.Close()
	for i := range f.cfg.Packages {
		if err := s.Handle(farmID(i)).BuildContext(ctx, func(context.Context) error { return nil }); err != nil {
			return err
		}
	}
	return nil
}

func farmID(i int) string { return fmt.Sprintf("pkg-%03d", i) }

func (f *farm) revision(ctx context.Context) int64 {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := f.cli.Get(cctx, f.prefix+"none")
	if err != nil {
		return 0
	}
	return resp.Header.Revision
}

// ErrFarmOverload is returned by Farm when this machine cannot start the
// jobs of a mode at the configured rate (the simulation would pile up
// instead of measuring): lower the rate per host, or the mode's MaxRate.
var ErrFarmOverload = errors.New("bench: farm: rate not sustainable here")

// farmMaxLag is how far the job generator may fall behind its schedule
// before the run stops with ErrFarmOverload.
const farmMaxLag = 2 * time.Second

// prewarm makes each host hold each package k with the steady state's
// probability, 1 − exp(−pₖ·rate·(linger + hold)), before the clock starts,
// with a bounded number of takes in flight. Without it the first linger of
// the run is a storm of first takes (up to hosts × packages etcd writes at
// once), which a real farm spreads over its start-up but which would swamp
// one small machine. The warm-up that follows (≥ linger + hold) lets every
// prewarmed reference the simulation does not use again expire, so the
// measured window does not depend on the prewarm.
func (f *farm) prewarm(ctx context.Context, hosts []farmHost, rng *rand.Rand, rate float64) (int, error) {
	type take struct {
		h  farmHost
		id string
	}
	var sum float64
	w := make([]float64, f.cfg.Packages)
	for k := range w {
		w[k] = math.Pow(1+float64(k), -f.cfg.ZipfS)
		sum += w[k]
	}
	x := rate * (f.cfg.Linger + f.cfg.Hold).Seconds()
	var takes []take
	for _, h := range hosts {
		for k, wk := range w {
			if rng.Float64() < 1-math.Exp(-wk/sum*x) {
				takes = append(takes, take{h, farmID(k)})
			}
		}
	}
	const inFlight = 256
	ch := make(chan take)
	errs := make([]error, inFlight)
	var wg sync.WaitGroup
	for i := range inFlight {
		wg.Go(func() {
			for t := range ch {
				if errs[i] == nil {
					errs[i] = t.h.prewarm(ctx, t.id)
				}
			}
		})
	}
	for _, t := range takes {
		ch <- t
	}
	close(ch)
	wg.Wait()
	return len(takes), errors.Join(errs...)
}

type farmStats struct {
	jobs   int
	starts []time.Duration
	took   time.Duration // from the first scheduled arrival to the last
}

// jobs starts jobs for d at rate per second in total (open loop: a slow
// job does not delay the next start, and a start that falls behind its
// schedule counts the delay) and waits for them to end. A job's start time
// is from its scheduled arrival (or from its start, if the generator
// started it early) to holding its package; each job holds it for Hold.
func (f *farm) jobs(ctx context.Context, hosts []farmHost, rng *rand.Rand, rate float64, d time.Duration) (farmStats, error) {
	zipf := rand.NewZipf(rng, f.cfg.ZipfS, 1, uint64(f.cfg.Packages-1))
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		st     farmStats
		errs   []error
		start  = time.Now()
		offset time.Duration
	)
	done := func(took time.Duration, err error) {
		mu.Lock()
		defer mu.Unlock()
		st.jobs++
		st.starts = append(st.starts, took)
		if err != nil && len(errs) < 5 {
			errs = append(errs, err)
		}
	}
	for {
		next := offset + time.Duration(rng.ExpFloat64()/rate*float64(time.Second))
		if next >= d {
			break
		}
		offset = next
		at := start.Add(offset)
		host, id := hosts[rng.IntN(len(hosts))], farmID(int(zipf.Uint64()))
		// Sleep only when a millisecond or more ahead of the schedule: the
		// timer's resolution, and at high rates one sleep per job would
		// be the generator's main cost.
		wait := time.Until(at)
		if wait >= time.Millisecond {
			select {
			case <-time.After(wait):
			case <-ctx.Done():
			}
		}
		if err := ctx.Err(); err != nil {
			wg.Wait()
			return st, err
		}
		if -wait > farmMaxLag {
			wg.Wait()
			return st, fmt.Errorf("%w: the job generator fell %v behind its schedule at %.0f jobs/s in total", ErrFarmOverload, -wait.Round(time.Millisecond), rate)
		}
		// A job started ahead of its arrival (the generator does not
		// sleep for less than a millisecond) is timed from its start;
		// one started behind it, from its arrival, so the lag counts.
		from := at
		if now := time.Now(); now.Before(at) {
			from = now
		}
		wg.Add(1)
		go func() {
			release, err := host.acquire(ctx, id)
			took := time.Since(from)
			if err != nil {
				done(took, err)
				wg.Done()
				return
			}
			time.AfterFunc(f.cfg.Hold, func() {
				defer wg.Done()
				done(took, release(ctx))
			})
		}()
	}
	st.took = offset
	wg.Wait()
	return st, errors.Join(errs...)
}

// directHosts: one store (one lease) per host; each job takes its own etcd
// reference.
func directHosts(ctx context.Context, f *farm, n int) ([]farmHost, error) {
	hosts := make([]farmHost, n)
	for i := range n {
		s, err := etcdstore.New(ctx, f.cli, f.root, f.storeOptions(fmt.Sprintf("host-%d", i))...)
		if err != nil {
			return nil, err
		}
		f.closes = append(f.closes, s.Close)
		hosts[i] = directHost{s}
	}
	return hosts, nil
}

type directHost struct{ s *etcdstore.Store }

func (h directHost) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	p := h.s.Handle(id)
	if err := p.IncRefContext(ctx); err != nil {
		return nil, err
	}
	return p.DecRefContext, nil
}

func (directHost) prewarm(context.Context, string) error { return nil }

// agentConfig is the node configuration of a simulated host: the node's
// defaults with the farm's linger.
func (f *farm) agentConfig(name, state string) node.Config {
	cfg := node.DefaultConfig()
	cfg.StateDir, cfg.Root, cfg.Prefix, cfg.Name = state, f.root, f.prefix, name
	cfg.Linger = f.cfg.Linger
	return cfg
}
