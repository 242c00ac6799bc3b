package bench

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/granary-build/granary/etcdstore"
)

// Sizes says how much work each scenario does.
type Sizes struct {
	// HotPairs is the number of IncRef+DecRef pairs per concurrency level
	// and per round (and as many raw Txn pairs).
	HotPairs int
	// HotConcurrency are the concurrency levels of the hot path; the last
	// is the one the main keys report.
	HotConcurrency []int
	// HotRounds alternates Granary and raw runs this many times per level,
	// so that load from other processes hits both alike.
	HotRounds int
	// WaiterStores × WaiterCounts goroutines wait on one build; the last
	// count is the one the main keys report.
	WaiterStores int
	WaiterCounts []int
	// WaiterRounds is the number of builds waited on per count.
	WaiterRounds int
	// StampedeCalls concurrent Build calls (spread over WaiterStores
	// stores) on one ID whose builder takes StampedeBuild.
	StampedeCalls  int
	StampedeBuild  time.Duration
	StampedeRounds int
	// DistinctBuilds trivial builds at DistinctConcurrency.
	DistinctBuilds      int
	DistinctConcurrency int
	// PrunePackages are the store sizes a prune sweep runs over.
	PrunePackages []int
	// PruneMaxRemovals caps each sweep, as the node's GC loop does.
	PruneMaxRemovals int
	// Refs is the number of references one store holds for the memory
	// scenario, spread over RefPackages packages.
	Refs        int
	RefPackages int
	// TTL and LockDelay of the stores (the takeover scenario waits for
	// both).
	TTL       time.Duration
	LockDelay time.Duration
}

// FullSizes is the published benchmark.
func FullSizes() Sizes {
	return Sizes{
		HotPairs: 2000, HotConcurrency: []int{1, 16, 64}, HotRounds: 3,
		WaiterStores: 3, WaiterCounts: []int{1, 10, 50}, WaiterRounds: 10,
		StampedeCalls: 150, StampedeBuild: 100 * time.Millisecond, StampedeRounds: 5,
		DistinctBuilds: 1000, DistinctConcurrency: 32,
		PrunePackages: []int{10_000, 100_000}, PruneMaxRemovals: 100,
		Refs: 10_000, RefPackages: 100,
		TTL: etcdstore.DefaultTTL, LockDelay: etcdstore.DefaultLockDelay,
	}
}

// QuickSizes is a run of under a minute on a small machine: the full
// scenarios with fewer pairs and rounds, and the shortest TTL (so the
// takeover waits 3 s + 1 s instead of 15 s + 5 s).
func QuickSizes() Sizes {
	z := FullSizes()
	z.HotPairs, z.HotRounds = 300, 2
	z.WaiterRounds, z.StampedeRounds = 3, 2
	z.DistinctBuilds = 200
	z.TTL, z.LockDelay = etcdstore.MinTTL, time.Second
	return z
}

// TinySizes runs every scenario on a token amount of work, for tests.
func TinySizes() Sizes {
	return Sizes{
		HotPairs: 20, HotConcurrency: []int{1, 4}, HotRounds: 1,
		WaiterStores: 2, WaiterCounts: []int{3}, WaiterRounds: 1,
		StampedeCalls: 12, StampedeBuild: 20 * time.Millisecond, StampedeRounds: 1,
		DistinctBuilds: 8, DistinctConcurrency: 4,
		PrunePackages: []int{300}, PruneMaxRemovals: 10,
		Refs: 50, RefPackages: 5,
		TTL: etcdstore.MinTTL, LockDelay: 100 * time.Millisecond,
	}
}

// Validate reports a size that cannot run.
func (z Sizes) Validate() error {
	switch {
	case z.HotPairs <= 0 || len(z.HotConcurrency) == 0 || z.HotRounds <= 0:
		return errors.New("bench: hot path needs pairs, concurrency levels and rounds")
	case z.WaiterStores <= 0 || len(z.WaiterCounts) == 0 || z.WaiterRounds <= 0:
		return errors.New("bench: waiters need stores, counts and rounds")
	case z.StampedeCalls <= 0 || z.StampedeRounds <= 0 || z.StampedeBuild < 0:
		return errors.New("bench: stampede needs calls and rounds")
	case z.DistinctBuilds <= 0 || z.DistinctConcurrency <= 0:
		return errors.New("bench: distinct builds need a count and a concurrency")
	case len(z.PrunePackages) == 0 || z.Refs <= 0 || z.RefPackages <= 0:
		return errors.New("bench: prune and refs need sizes")
	case z.TTL < etcdstore.MinTTL || z.TTL%time.Second != 0 || z.LockDelay < 0:
		return fmt.Errorf("bench: TTL %v must be whole seconds and at least %v; lock delay %v not negative", z.TTL, etcdstore.MinTTL, z.LockDelay)
	}
	for _, c := range append(append([]int{}, z.HotConcurrency...), z.WaiterCounts...) {
		if c <= 0 {
			return fmt.Errorf("bench: concurrency %d must be positive", c)
		}
	}
	return nil
}

// Config is one benchmark run.
type Config struct {
	Sizes Sizes
	// NewClient returns a new etcd client (one per simulated host) with
	// extra dial options added; the bench uses them to count requests.
	NewClient func(extra ...grpc.DialOption) (*clientv3.Client, error)
	// Dir is where the run's temporary shared root is made (removed
	// afterwards); empty means os.TempDir(). Put it on the farm's shared
	// volume to include its cost.
	Dir string
	// Child, if set, returns the command of a child process running
	// ChildMain with args (for example this program re-executed); the
	// memory scenarios run there, so that their RSS is theirs alone.
	// Without it they run in this process and report the Go heap only.
	Child func(ctx context.Context, args []string) *exec.Cmd
	// Run, if set, returns the command `granary ARGS` with the connection
	// settings of the run and env added to its environment; the agent
	// scenario times warm `granary run` jobs with it. Without it, that part
	// is skipped.
	Run runCommand
	// RunLight, if set, returns the command `granary-run ARGS` (the light
	// job launcher, cmd/granary-run) with env added to its environment;
	// the agent scenario times warm jobs with it next to `granary run`.
	RunLight runCommand
	// Only, if set, names the scenarios to run (Scenarios lists them);
	// empty runs them all.
	Only []string
	// Progress receives one line per step; nil discards.
	Progress io.Writer
	// OpTimeout bounds each etcd call of the bench itself and of its stores.
	OpTimeout time.Duration
}

// Report is the outcome of a run.
type Report struct {
	// Results are the measured values by key (the JSON keys of the issue:
	// hotpath_ops_per_s, waiters_release_p99_ms, …).
	Results map[string]float64
	// Goals are the targets, each with whether this run met it.
	Goals []Goal
	// Meta describes the run (date, machine, sizes).
	Meta Meta
	// Series hold the curves of the chart.
	Series Series
}

// Meta describes where and how a run was made.
type Meta struct {
	Date      time.Time `json:"date"`
	GoVersion string    `json:"go_version"`
	CPUs      int       `json:"cpus"`
	CPUModel  string    `json:"cpu_model,omitempty"`
	Sizes     string    `json:"sizes"`
	Memory    string    `json:"memory"` // what the RSS keys measured
	Elapsed   float64   `json:"elapsed_s"`
}

// Series are the curves of the chart: by concurrency level.
type Series struct {
	HotConcurrency []int     `json:"hot_concurrency"`
	HotGranary     []float64 `json:"hot_granary_ops_per_s"`
	HotRaw         []float64 `json:"hot_raw_ops_per_s"`
	// HotAgent: the same pairs through the host agent (an agent.Conn per
	// caller, on a package the host holds: no etcd request).
	HotAgent  []float64 `json:"hot_agent_ops_per_s,omitempty"`
	Waiters   []int     `json:"waiters"` // total goroutines waiting
	WaiterP50 []float64 `json:"waiters_p50_ms"`
	WaiterP99 []float64 `json:"waiters_p99_ms"`
}

// Goal is one target of the issue.
type Goal struct {
	Key  string  `json:"key"`
	Want string  `json:"want"`
	Got  float64 `json:"got"`
	Met  bool    `json:"met"`
}

// run is the state of one Run.
type run struct {
	cfg    Config
	z      Sizes
	root   string
	prefix string
	cnt    *Counter
	res    map[string]float64
	series Series
	memory string

	mu      sync.Mutex
	clients []*clientv3.Client
	stores  []*etcdstore.Store
}

// scenarios are the steps of a run, in order: a key for Config.Only and a
// name for the progress lines.
var scenarios = []struct{ key, name string }{
	{key: "hotpath", name: "hot path"},
	{key: "agent", name: "host agent"},
	{key: "waiters", name: "waiters"},
	{key: "stampede", name: "stampede"},
	{key: "distinct", name: "distinct builds"},
	{key: "takeover", name: "takeover"},
	{key: "prune", name: "prune"},
	{key: "refs", name: "references"},
	{key: "needs", name: "needs"},
}

// Scenarios returns the keys of the scenarios, in the order they run.
func Scenarios() []string {
	var out []string
	for _, s := range scenarios {
		out = append(out, s.key)
	}
	return out
}

// validateOnly reports a name in Only that is not a scenario.
func (c *Config) validateOnly() error {
	for _, o := range c.Only {
		if !slices.Contains(Scenarios(), o) {
			return fmt.Errorf("bench: no scenario %q (scenarios: %s)", o, strings.Join(Scenarios(), ", "))
		}
	}
	return nil
}

// Run runs every scenario against the etcd that cfg.NewClient reaches,
// under a key prefix of its own (deleted at the end) and a temporary root.
// It blocks for the whole run; ctx cancels it.
func Run(ctx context.Context, cfg Config) (rep *Report, err error) {
	if err := cfg.Sizes.Validate(); err != nil {
		return nil, err
	}
	if err := cfg.validateOnly(); err != nil {
		return nil, err
	}
	if cfg.NewClient == nil {
		return nil, errors.New("bench: no etcd client factory")
	}
	if cfg.OpTimeout <= 0 {
		cfg.OpTimeout = etcdstore.DefaultOpTimeout
	}
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	root, err := os.MkdirTemp(cfg.Dir, "granary-bench-")
	if err != nil {
		return nil, fmt.Errorf("bench: temporary root: %w", err)
	}
	r := &run{
		cfg: cfg, z: cfg.Sizes, root: root,
		prefix: "/granary-bench-" + strings.ToLower(rand.Text()[:10]) + "/",
		cnt:    &Counter{}, res: map[string]float64{},
	}
	defer func() { err = errors.Join(err, r.close()) }()

	start := time.Now()
	fns := map[string]func(context.Context) error{
		"hotpath": r.hotpath, "agent": r.agent, "waiters": r.waiters, "stampede": r.stampede,
		"distinct": r.distinct, "takeover": r.takeover, "prune": r.prune, "refs": r.refs, "needs": r.needs,
	}
	for _, st := range scenarios {
		if len(cfg.Only) > 0 && !slices.Contains(cfg.Only, st.key) {
			continue
		}
		t := time.Now()
		r.logf("%s…", st.name)
		if err := fns[st.key](ctx); err != nil {
			return nil, fmt.Errorf("bench: %s: %w", st.name, err)
		}
		r.logf("%s done in %.1fs", st.name, time.Since(t).Seconds())
	}
	r.series.HotAgent = nil
	for _, c := range r.series.HotConcurrency {
		if v, ok := r.res[fmt.Sprintf("agent_ops_per_s_c%d", c)]; ok {
			r.series.HotAgent = append(r.series.HotAgent, v)
		}
	}
	if len(r.series.HotAgent) != len(r.series.HotConcurrency) {
		r.series.HotAgent = nil // the agent scenario did not run at every level
	}
	rep = &Report{Results: r.res, Series: r.series, Goals: goals(r.res)}
	rep.Meta = Meta{
		Date: start.UTC(), GoVersion: runtime.Version(), CPUs: runtime.NumCPU(), CPUModel: cpuModel(),
		Sizes: fmt.Sprintf("%+v", r.z), Memory: r.memory, Elapsed: time.Since(start).Seconds(),
	}
	return rep, nil
}

func (r *run) logf(format string, args ...any) {
	fmt.Fprintf(r.cfg.Progress, "bench: "+format+"\n", args...)
}

// client returns a new client whose requests are counted.
func (r *run) client() (*clientv3.Client, error) {
	cli, err := r.cfg.NewClient(grpc.WithChainUnaryInterceptor(r.cnt.interceptor))
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.clients = append(r.clients, cli)
	r.mu.Unlock()
	return cli, nil
}

// store opens a store on a new counted client: one simulated host.
func (r *run) store(ctx context.Context, host string, opts ...etcdstore.Option) (*etcdstore.Store, *clientv3.Client, error) {
	cli, err := r.client()
	if err != nil {
		return nil, nil, err
	}
	s, err := etcdstore.New(ctx, cli, r.root, append(r.storeOptions(host), opts...)...)
	if err != nil {
		return nil, nil, err
	}
	r.mu.Lock()
	r.stores = append(r.stores, s)
	r.mu.Unlock()
	return s, cli, nil
}

func (r *run) storeOptions(host string) []etcdstore.Option {
	return []etcdstore.Option{
		etcdstore.WithPrefix(r.prefix), etcdstore.WithTTL(r.z.TTL), etcdstore.WithLockDelay(r.z.LockDelay),
		etcdstore.WithHost(host), etcdstore.WithOpTimeout(r.cfg.OpTimeout),
	}
}

// opCtx bounds one etcd call of the bench itself.
func (r *run) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(clientv3.WithRequireLeader(ctx), r.cfg.OpTimeout)
}

// close closes the stores, deletes the run's keys, closes the clients and
// removes the temporary root.
func (r *run) close() error {
	var errs []error
	for _, s := range r.stores {
		s.Close() //nolint:errcheck // a store whose client was killed cannot revoke; its lease expires
	}
	if len(r.clients) > 0 {
		cli, err := r.cfg.NewClient()
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 4*r.cfg.OpTimeout)
			_, err = cli.Delete(ctx, r.prefix, clientv3.WithPrefix())
			cancel()
			cli.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("bench: delete keys under %s: %w", r.prefix, err))
		}
	}
	for _, c := range r.clients {
		c.Close()
	}
	if err := etcdstore.RemoveTree(r.root); err != nil {
		errs = append(errs, fmt.Errorf("bench: remove %s: %w", r.root, err))
	}
	return errors.Join(errs...)
}

// quantile returns the q-quantile (nearest rank) of xs, sorting xs.
func quantile(xs []time.Duration, q float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	sort.Slice(xs, func(i, j int) bool { return xs[i] < xs[j] })
	i := int(q*float64(len(xs))+0.999999) - 1
	return xs[max(0, min(i, len(xs)-1))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// parallel runs op n times on c goroutines and returns the wall time and
// each op's returned latency. It stops at the first error.
func parallel(ctx context.Context, c, n int, op func(ctx context.Context, i int) (time.Duration, error)) (time.Duration, []time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu   sync.Mutex
		next int
		lats = make([]time.Duration, 0, n)
		errs []error
		wg   sync.WaitGroup
	)
	take := func() (int, bool) {
		mu.Lock()
		defer mu.Unlock()
		if next >= n || ctx.Err() != nil {
			return 0, false
		}
		next++
		return next - 1, true
	}
	start := time.Now()
	for range c {
		wg.Go(func() {
			for {
				i, ok := take()
				if !ok {
					return
				}
				lat, err := op(ctx, i)
				mu.Lock()
				if err != nil {
					if len(errs) == 0 {
						errs = append(errs, err) // the first is the cause; the rest follow from cancel
					}
					cancel()
				} else {
					lats = append(lats, lat)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return time.Since(start), lats, errors.Join(errs...)
}
