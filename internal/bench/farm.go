package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// FarmConfig is a farm simulation: Hosts simulated hosts in one process
// start jobs at Rate per second in total (Poisson arrivals, each on a host
// drawn uniformly), each job holding one of Packages published packages
// (drawn with Zipf popularity, exponent ZipfS) for Hold, against a
// 3-member embedded etcd cluster with fsync on. Each host count runs in
// every mode: "direct" (each job takes its own etcd reference, as a
// process with its own store does) and, where the mode is wired, "agent"
// (jobs take references through their host's node, which holds one etcd
// reference per package and releases it Linger after the last local job).
// A warm-up of Warm precedes the measured Duration.
type FarmConfig struct {
	Hosts    []int
	Packages int
	ZipfS    float64
	Rate     float64
	Duration time.Duration
	Warm     time.Duration
	Hold     time.Duration
	Linger   time.Duration
	Dir      string    // where the shared root is made; empty: os.TempDir()
	Progress io.Writer // one line per step; nil discards
}

// DefaultFarm is the published farm simulation.
func DefaultFarm() FarmConfig {
	return FarmConfig{
		Hosts: []int{10, 100, 1000}, Packages: 100, ZipfS: 1.1,
		Rate: 1000, Duration: 10 * time.Second, Warm: 3 * time.Second, Hold: 20 * time.Millisecond,
		Linger: 5 * time.Second,
	}
}

// farmHost is one simulated host: how a job on it takes a package.
type farmHost interface {
	acquire(ctx context.Context, id string) (release func(context.Context) error, err error)
}

// farmMode makes the hosts of one mode on a shared etcd client and root.
type farmMode struct {
	name  string
	hosts func(ctx context.Context, f *farm, n int) ([]farmHost, error)
}

// farmModes are the modes the simulation runs; the agent mode is added
// where the node's local API is available (see agentFarmMode).
var farmModes = []farmMode{{name: "direct", hosts: directHosts}}

type farm struct {
	cfg    FarmConfig
	cl     *etcdtest.Cluster
	cnt    *Counter
	cli    *clientv3.Client
	base   string // the temporary directory holding every run's root
	root   string // the current run's shared root (a root is bound to one prefix)
	prefix string
	closes []func() error
	res    map[string]float64
}

// Farm runs the simulation and returns its results by key
// (farm_<mode>_h<H>_<figure>).
func Farm(ctx context.Context, cfg FarmConfig) (res map[string]float64, err error) {
	if cfg.Packages <= 0 || cfg.Rate <= 0 || cfg.Duration <= 0 || cfg.ZipfS <= 1 || len(cfg.Hosts) == 0 {
		return nil, errors.New("bench: farm needs packages, a rate, a duration, hosts and a Zipf exponent > 1")
	}
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	f := &farm{cfg: cfg, cnt: &Counter{}, res: map[string]float64{}}
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
		for _, m := range farmModes {
			if err := f.runMode(ctx, m, h); err != nil {
				return nil, fmt.Errorf("bench: farm %s at %d hosts: %w", m.name, h, err)
			}
		}
	}
	return f.res, nil
}

// runMode publishes the packages under a fresh prefix, makes the hosts,
// warms up and measures.
func (f *farm) runMode(ctx context.Context, m farmMode, n int) (err error) {
	f.prefix = fmt.Sprintf("/granary-farm-%s-%d/", m.name, n)
	f.root = filepath.Join(f.base, fmt.Sprintf("%s-%d", m.name, n))
	defer func() { err = errors.Join(err, f.closeAll()) }()
	if err := f.publish(ctx); err != nil {
		return err
	}
	fmt.Fprintf(f.cfg.Progress, "farm: %s, %d hosts: making the hosts\n", m.name, n)
	hosts, err := m.hosts(ctx, f, n)
	if err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(uint64(n), 1))
	if _, err := f.jobs(ctx, hosts, rng, f.cfg.Warm); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	before, rev0 := f.cnt.Snapshot(), f.revision(ctx)
	st, err := f.jobs(ctx, hosts, rng, f.cfg.Duration)
	if err != nil {
		return err
	}
	c, rev1 := f.cnt.Snapshot().Sub(before), f.revision(ctx)
	key := fmt.Sprintf("farm_%s_h%d_", m.name, n)
	f.res[key+"jobs"] = float64(st.jobs)
	f.res[key+"writes_per_s"] = float64(c.Writes) / f.cfg.Duration.Seconds()
	f.res[key+"writes_per_job"] = float64(c.Writes) / float64(st.jobs)
	f.res[key+"revisions_per_job"] = float64(rev1-rev0) / float64(st.jobs)
	f.res[key+"start_p50_ms"] = ms(quantile(st.starts, 0.5))
	f.res[key+"start_p99_ms"] = ms(quantile(st.starts, 0.99))
	fmt.Fprintf(f.cfg.Progress, "farm: %s, %d hosts: %d jobs, %.0f etcd writes/s, %.4f writes per job, start p50 %.2f ms p99 %.2f ms\n",
		m.name, n, st.jobs, f.res[key+"writes_per_s"], f.res[key+"writes_per_job"], f.res[key+"start_p50_ms"], f.res[key+"start_p99_ms"])
	return nil
}

func (f *farm) closeAll() error {
	var errs []error
	for i := len(f.closes) - 1; i >= 0; i-- {
		errs = append(errs, f.closes[i]())
	}
	f.closes = nil
	return errors.Join(errs...)
}

func (f *farm) storeOptions(host string) []etcdstore.Option {
	return []etcdstore.Option{etcdstore.WithPrefix(f.prefix), etcdstore.WithHost(host)}
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

type farmStats struct {
	jobs   int
	starts []time.Duration
}

// jobs starts jobs for d at the configured rate (open loop: a slow job
// does not delay the next start) and waits for them. A job's start time is
// from its scheduled arrival to holding its package.
func (f *farm) jobs(ctx context.Context, hosts []farmHost, rng *rand.Rand, d time.Duration) (farmStats, error) {
	zipf := rand.NewZipf(rng, f.cfg.ZipfS, 1, uint64(f.cfg.Packages-1))
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		st     farmStats
		errs   []error
		start  = time.Now()
		offset time.Duration
	)
	for offset < d {
		offset += time.Duration(rng.ExpFloat64() / f.cfg.Rate * float64(time.Second))
		at := start.Add(offset)
		host, id := hosts[rng.IntN(len(hosts))], farmID(int(zipf.Uint64()))
		if wait := time.Until(at); wait > 0 {
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				wg.Wait()
				return st, ctx.Err()
			}
		}
		wg.Go(func() {
			release, err := host.acquire(ctx, id)
			took := time.Since(at)
			if err == nil {
				time.Sleep(f.cfg.Hold)
				err = release(ctx)
			}
			mu.Lock()
			defer mu.Unlock()
			st.jobs++
			st.starts = append(st.starts, took)
			if err != nil && len(errs) < 5 {
				errs = append(errs, err)
			}
		})
	}
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
