package soak

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/jobrun"
	"github.com/granary-build/granary/node"
)

// Environment of soakjob (see testdata/soakjob).
const (
	envJobReports    = "SOAKJOB_REPORTS"
	envJobExcuseWait = "SOAKJOB_EXCUSE_WAIT"
)

// farm is one soak: the etcd cluster, the hosts and their nodes, the
// package IDs, and the tally of what happened. Its goroutines (launchers,
// churn, faults) are started and waited for by run; its processes are
// killed by t.Cleanup.
type farm struct {
	t       *testing.T
	cfg     soakConfig
	bin     binaries
	dir     string // logs and reports
	root    string // the shared root
	reports string // soakjob's reports
	etcd    *etcdCluster
	cli     *clientv3.Client // the soak's own view of etcd, for the final checks
	hosts   []*host
	ids     []string        // most popular first
	failing map[string]bool // IDs whose builds fail on purpose
	// needs are the packages each ID is built on: every third ID needs the
	// one before it (never a failing one), so jobs hold closures and rm,
	// gc and invalidate meet dependents.
	needs map[string][]string
	start time.Time
	tally tally
}

// newFarm builds the binaries and starts the etcd cluster and one node per
// host.
func newFarm(t *testing.T, cfg soakConfig) *farm {
	f := &farm{t: t, cfg: cfg, failing: map[string]bool{}, needs: map[string][]string{}}
	f.dir = cfg.Dir
	if f.dir != "" {
		// etcd's data and the shared root must be new.
		if ents, _ := os.ReadDir(f.dir); len(ents) > 0 {
			t.Fatalf("%s=%s: not empty; give a new directory", envDir, f.dir)
		}
	} else {
		f.dir = t.TempDir()
		// Published trees are read-only: TempDir's RemoveAll cannot
		// delete them unless run as root.
		t.Cleanup(func() { etcdstore.RemoveTree(f.root) }) //nolint:errcheck // TempDir reports what is left
	}
	f.root = filepath.Join(f.dir, "root")
	f.reports = filepath.Join(f.dir, "reports")
	if err := os.MkdirAll(f.reports, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range cfg.Packages {
		id := fmt.Sprintf("soak-%02d", i)
		f.ids = append(f.ids, id)
		h := fnv.New32a()
		h.Write([]byte(id))
		if int(h.Sum32()%100) < cfg.FailPercent {
			f.failing[id] = true
		}
	}
	for i, id := range f.ids {
		if i%3 == 2 && !f.failing[f.ids[i-1]] {
			f.needs[id] = []string{f.ids[i-1]}
		}
	}
	built := time.Now()
	f.bin = buildBinaries(t)
	t.Logf("built the binaries in %v", time.Since(built).Round(100*time.Millisecond))

	f.etcd = startEtcd(t, f.bin.etcd, f.dir)
	cli, err := clientv3.New(clientv3.Config{Endpoints: f.etcd.endpoints(), Logger: zap.NewNop(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	f.cli = cli

	// One node at a time: the first binds the shared root to the prefix.
	for i := range cfg.Hosts {
		h := &host{name: fmt.Sprintf("host%d", i), bin: f.bin.granary}
		h.stateDir = filepath.Join(f.dir, h.name)
		h.logPath = filepath.Join(f.dir, h.name+".log")
		h.env = f.env(h)
		h.args = []string{"serve",
			"--linger", cfg.Linger.String(),
			"--gc-interval", "0", // the soak runs gc itself, from random hosts
		}
		if err := h.start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(h.kill)
		if err := h.waitReady(30 * time.Second); err != nil {
			t.Fatal(err)
		}
		f.hosts = append(f.hosts, h)
	}
	return f
}

// env is the environment of host h's node and of every command run on h.
func (f *farm) env(h *host) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GRANARY_") && !strings.HasPrefix(kv, "SOAKJOB_") {
			env = append(env, kv)
		}
	}
	return append(env,
		node.EnvEndpoints+"="+strings.Join(f.etcd.endpoints(), ","),
		node.EnvRoot+"="+f.root,
		node.EnvStateDir+"="+h.stateDir,
		node.EnvHost+"="+h.name,
		node.EnvTTL+"="+strconv.Itoa(int(f.cfg.TTL/time.Second)),
		envJobReports+"="+f.reports,
		envJobExcuseWait+"="+f.excuseWait().String(),
	)
}

// excuseWait is how long a job whose check failed waits for its launcher
// to stop it: the time for a lost reference to be noticed and reported
// (a lease's renewal failing, or a killed node's restart and the job's
// reconnection), with room to spare.
func (f *farm) excuseWait() time.Duration {
	return 2*f.cfg.TTL + f.cfg.NodeDown + 5*time.Second
}

// cmdTimeout bounds every command the soak runs: a job may wait
// excuseWait, or reconnect to its node for jobrun.ReconnectWithin, and
// builds take a second. One that takes longer is reported as hung.
func (f *farm) cmdTimeout() time.Duration {
	return f.excuseWait() + jobrun.ReconnectWithin + 10*time.Second
}

// logf logs with the time since the start and the wall clock in UTC, as
// the nodes' logs have it.
func (f *farm) logf(format string, args ...any) {
	f.t.Helper()
	now := time.Now()
	f.t.Logf("%6.1fs %s  %s", now.Sub(f.start).Seconds(), now.UTC().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

// run runs the launchers, the churn and the faults for cfg.Duration, then
// stops them and waits for them:
//
//  1. the launchers stop starting jobs; the jobs in progress finish;
//  2. the churn stops after its command in progress;
//  3. the fault in progress is undone (a frozen member thawed, a killed
//     node or member started again), so every process runs at the end.
func (f *farm) run() {
	f.start = time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), f.cfg.Duration)
	defer cancel()
	seed := f.cfg.Seed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	f.logf("soak for %v: %d hosts × %d launchers, %d packages (failing on purpose: %v), TTL %v, linger %v, faults %v every %v, seed %d (%s)",
		f.cfg.Duration, f.cfg.Hosts, f.cfg.LaunchersPerHost, len(f.ids), slices.Sorted(maps.Keys(f.failing)),
		f.cfg.TTL, f.cfg.Linger, f.cfg.Faults, f.cfg.FaultEvery, seed, envSeed)
	var wg sync.WaitGroup
	stream := uint64(0)
	rng := func() *rand.Rand { stream++; return rand.New(rand.NewPCG(seed, stream)) }
	for _, h := range f.hosts {
		for range f.cfg.LaunchersPerHost {
			r := rng()
			wg.Go(func() { f.launcher(ctx, h, r) })
		}
	}
	r1, r2, r3 := rng(), rng(), rng()
	wg.Go(func() { f.removals(ctx, r1) })
	wg.Go(func() { f.collections(ctx, r2) })
	if f.cfg.InvalidateEvery > 0 {
		r4 := rng()
		wg.Go(func() { f.invalidations(ctx, r4) })
	}
	if len(f.cfg.Faults) > 0 {
		wg.Go(func() { f.faults(ctx, r3) })
	}
	<-ctx.Done()
	f.logf("stopping: waiting for the jobs, the churn and the fault in progress")
	wg.Wait()
	f.logf("stopped")
}

// every waits d, and reports false instead if ctx ends first.
func every(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// launcher runs one job after another on h until ctx ends, each on a
// package picked by popularity.
func (f *farm) launcher(ctx context.Context, h *host, rng *rand.Rand) {
	zipf := rand.NewZipf(rng, f.cfg.ZipfS, 1, uint64(len(f.ids)-1))
	for ctx.Err() == nil {
		f.job(h, f.ids[zipf.Uint64()])
	}
}

// job is a farm's job script: `granary-run ID -- soakjob check ID`, and if
// the package does not exist, `granary build` first and run again.
func (f *farm) job(h *host, id string) {
	for range 3 {
		kills := h.kills.Load()
		res := f.exec(h, f.bin.granaryRun, id, "--", f.bin.job, "check", id)
		switch {
		case res.hung: // listed among the hangs
		case res.code == 0:
			f.tally.jobs.Add(1)
			return
		case res.code == jobrun.ExitNotExist:
			if !f.build(h, id) {
				return
			}
			continue // built (or found): run again
		case strings.Contains(res.stderr, "soakjob stopped: "):
			// granary-run was told the reference was lost and stopped the
			// job: not a violation (a check that failed before the stop
			// wrote an "excused" report).
			f.tally.jobsStopped.Add(1)
			f.tally.note("job stopped by granary-run", fmt.Sprintf("%s on %s: %s", id, h.name, res.tail()))
		case strings.Contains(res.stderr, "soakjob: MISMATCH"):
			f.tally.jobsFailedCheck.Add(1) // its violation report says what
		case h.kills.Load() != kills:
			// Not counted as a failure, but listed: a job that was
			// starting when its node was killed fails, where it could
			// retry or fall back to a store of its own.
			f.tally.note("job error when its node was killed", fmt.Sprintf("%s on %s: exit %d after %v: %s", id, h.name, res.code, res.took.Round(time.Millisecond), res.tail()))
		default:
			f.tally.jobErrors.Add(1)
			f.tally.note("job error", fmt.Sprintf("%s on %s: exit %d after %v: %s", id, h.name, res.code, res.took.Round(time.Millisecond), res.tail()))
		}
		return
	}
	f.tally.jobsGaveUp.Add(1) // removed again after each build
}

// build builds id on h as a job script does when its package is missing,
// and reports whether the package is available now.
func (f *farm) build(h *host, id string) bool {
	argv := []string{f.bin.granary, "build", id}
	for _, n := range f.needs[id] {
		argv = append(argv, "--needs", n)
	}
	argv = append(argv, "--", f.bin.job, "build", id)
	if f.failing[id] {
		argv = append(argv, "fail")
	}
	kills := h.kills.Load()
	res := f.exec(h, argv...)
	if res.code == jobrun.ExitNotExist && len(f.needs[id]) > 0 {
		// A need is missing (or invalid): build it as a job script would,
		// then this one again.
		f.tally.needsFirst.Add(1)
		for _, n := range f.needs[id] {
			if !f.build(h, n) {
				return false
			}
		}
		res = f.exec(h, argv...)
	}
	switch {
	case res.hung: // listed among the hangs
	case res.code == 0 && f.failing[id]:
		f.tally.failure(fmt.Sprintf("%s on %s: published although its builder always fails: %s", id, h.name, res.tail()))
		return true
	case res.code == 0:
		switch {
		case strings.Contains(res.stderr, id+": built in"):
			f.tally.buildsRan.Add(1)
		case strings.Contains(res.stderr, id+": already available"):
			f.tally.buildsFound.Add(1)
		default:
			f.tally.buildsWaited.Add(1) // built by another job, here or on another host
		}
		return true
	case f.failing[id]:
		f.tally.failIntended.Add(1)
	case f.cfg.InvalidateEvery > 0 && strings.Contains(res.stderr, "invalidated"):
		// A need (or the package) was invalidated while the build ran:
		// its publish is refused, as it must be.
		f.tally.failInvalidated.Add(1)
	case h.kills.Load() != kills && strings.Contains(res.stderr, "the local node went away"):
		// The builder runs in this process, for the node: a node killed
		// mid-build abandons the attempt, and says so.
		f.tally.failNodeKilled.Add(1)
	case f.cfg.revocationsExpected() && leaseLost(res.stderr):
		f.tally.failLeaseLost.Add(1)
	default:
		msg := fmt.Sprintf("%s on %s: exit %d after %v: %s", id, h.name, res.code, res.took.Round(time.Millisecond), res.tail())
		switch {
		case leaseLost(res.stderr):
			msg += " [lease lost although no fault may revoke it]"
		case strings.Contains(res.stderr, "rpc error"), strings.Contains(res.stderr, "etcdserver: "), strings.Contains(res.stderr, "etcd did not answer in time"):
			// Still a failure: the store does not retry an etcd call that
			// a frozen or restarted member cut (docs/design.md, "What the
			// client cannot fix"), and a farm's build then fails.
			msg += " [an etcd call cut by a fault]"
		}
		f.tally.failure(msg)
	}
	return false
}

// leaseLost reports whether a command's stderr says its lease was lost.
func leaseLost(stderr string) bool {
	return strings.Contains(stderr, "lease lost") || strings.Contains(stderr, "lease with etcd was lost")
}

// removals runs `granary rm` of a random ID from a random host, every
// RmEvery, until ctx ends.
func (f *farm) removals(ctx context.Context, rng *rand.Rand) {
	for every(ctx, f.cfg.RmEvery) {
		h, id := f.hosts[rng.IntN(len(f.hosts))], f.ids[rng.IntN(len(f.ids))]
		res := f.exec(h, f.bin.granary, "rm", id)
		switch {
		case res.code == 0:
			f.tally.removed.Add(1)
		case res.code == jobrun.ExitNotExist:
			f.tally.rmAbsent.Add(1)
		case strings.Contains(res.stderr, "refused"):
			f.tally.rmRefused.Add(1)
		default:
			f.tally.rmErrors.Add(1)
			f.tally.note("rm error", fmt.Sprintf("%s from %s: exit %d: %s", id, h.name, res.code, res.tail()))
		}
	}
}

// collections runs `granary gc` from a random host every GCEvery until
// ctx ends.
func (f *farm) collections(ctx context.Context, rng *rand.Rand) {
	age := f.cfg.GCOlderThan.String()
	for every(ctx, f.cfg.GCEvery) {
		h := f.hosts[rng.IntN(len(f.hosts))]
		res := f.exec(h, f.bin.granary, "gc", "--json", "--older-than", age, "--grace", age)
		var rep etcdstore.PruneReport
		if err := json.Unmarshal([]byte(res.stdout), &rep); res.code != 0 || err != nil {
			f.tally.gcErrors.Add(1)
			f.tally.note("gc error", fmt.Sprintf("from %s: exit %d: %s", h.name, res.code, res.tail()))
			continue
		}
		f.tally.gcSweeps.Add(1)
		f.tally.gcRemoved.Add(int64(len(rep.Removed)))
	}
}

// invalidations runs `granary invalidate` of a random ID from a random
// host every InvalidateEvery, until ctx ends.
func (f *farm) invalidations(ctx context.Context, rng *rand.Rand) {
	for every(ctx, f.cfg.InvalidateEvery) {
		h, id := f.hosts[rng.IntN(len(f.hosts))], f.ids[rng.IntN(len(f.ids))]
		res := f.exec(h, f.bin.granary, "invalidate", id, "--reason", "soak")
		switch {
		case res.code == 0:
			f.tally.invalidated.Add(1)
		case res.code == jobrun.ExitNotExist:
			f.tally.invAbsent.Add(1)
		default:
			f.tally.invErrors.Add(1)
			f.tally.note("invalidate error", fmt.Sprintf("%s from %s: exit %d: %s", id, h.name, res.code, res.tail()))
		}
	}
}

// faults injects one fault every FaultEvery, cycling through cfg.Faults,
// until ctx ends; the fault in progress then completes.
func (f *farm) faults(ctx context.Context, rng *rand.Rand) {
	for i := 0; every(ctx, f.cfg.FaultEvery); i++ {
		fault := f.cfg.Faults[i%len(f.cfg.Faults)]
		if err := f.inject(fault, rng); err != nil {
			f.tally.harness(fmt.Sprintf("%s: %v", fault, err))
			continue
		}
		f.tally.fault(fault)
	}
}

// inject causes fault and undoes it.
func (f *farm) inject(fault string, rng *rand.Rand) error {
	switch fault {
	case faultLeaderFreeze, faultFollowerFreeze:
		leader, follower, err := f.etcd.leader(10 * time.Second)
		if err != nil {
			return err
		}
		m, d, role := leader, f.cfg.LeaderFreeze, "leader"
		if fault == faultFollowerFreeze {
			m, d, role = follower, f.cfg.FollowerFreeze, "follower"
		}
		f.logf("fault: SIGSTOP etcd %s %s for %v", role, m.name, d)
		if err := m.signal(syscall.SIGSTOP); err != nil {
			return err
		}
		time.Sleep(d) // the fault is its length
		return m.signal(syscall.SIGCONT)
	case faultLeaderRestart:
		leader, _, err := f.etcd.leader(10 * time.Second)
		if err != nil {
			return err
		}
		f.logf("fault: kill -9 etcd leader %s and start it again", leader.name)
		leader.kill()
		if err := f.etcd.start(leader); err != nil {
			return err
		}
		return f.etcd.waitReady(leader, 30*time.Second)
	case faultNodeKill:
		h := f.hosts[rng.IntN(len(f.hosts))]
		f.logf("fault: kill -9 the node of %s (pid %d); start it again %v later", h.name, h.pid(), f.cfg.NodeDown)
		h.kill()
		time.Sleep(f.cfg.NodeDown) // the fault is its length
		if err := h.start(); err != nil {
			return err
		}
		return h.waitReady(30 * time.Second)
	}
	return fmt.Errorf("unknown fault %q", fault)
}

// result is a finished command's.
type result struct {
	code           int  // exit code; -1 if it could not run or was killed
	hung           bool // killed after cmdTimeout (already in the tally's hangs)
	stdout, stderr string
	took           time.Duration
}

// tail is the last lines of stderr, for reports.
func (r result) tail() string {
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if len(lines) > 4 {
		lines = lines[len(lines)-4:]
	}
	return strings.Join(lines, " | ")
}

// exec runs argv as a command on host h (its environment). The end of
// the soak does not stop it: a command in progress finishes. One that
// outlives cmdTimeout is hung: it gets SIGQUIT, so that a Go program
// prints where each of its goroutines is (granary-run, once it runs its
// job, forwards it to the job instead), then SIGKILL; its whole stderr is
// kept in a file of the soak's directory.
func (f *farm) exec(h *host, argv ...string) result { return f.execEnv(h.env, argv...) }

// execEnv is exec with environment env.
func (f *farm) execEnv(env []string, argv ...string) result {
	ctx, cancel := context.WithTimeout(context.Background(), f.cmdTimeout())
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGQUIT) }
	cmd.WaitDelay = 15 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	res := result{stdout: stdout.String(), stderr: stderr.String(), took: time.Since(start)}
	var xe *exec.ExitError
	switch {
	case ctx.Err() != nil:
		res.code, res.hung = -1, true
		name := filepath.Join(f.dir, fmt.Sprintf("hung-%d.txt", f.tally.hungCount.Add(1)))
		os.WriteFile(name, []byte(strings.Join(argv, " ")+"\n\n"+res.stderr), 0o644) //nolint:errcheck // a report's detail
		said, _, _ := strings.Cut(res.stderr, "SIGQUIT: quit")
		res.stderr = fmt.Sprintf("%s\n(hung: stopped after %v; its stderr, with the goroutines of a Go program, is in %s)", said, f.cmdTimeout(), name)
		f.tally.hung(fmt.Sprintf("%s after %v: %s", strings.Join(argv, " "), res.took.Round(time.Millisecond), res.tail()))
	case errors.As(err, &xe):
		res.code = xe.ExitCode()
	case err != nil:
		res.code = -1
		res.stderr += "\n" + err.Error()
	}
	if res.took > slowCommand {
		f.tally.note("slow command", fmt.Sprintf("%s took %v, exit %d: %s", strings.Join(argv, " "), res.took.Round(time.Millisecond), res.code, res.tail()))
	}
	return res
}

// slowCommand is how long a command may take before the soak lists it in
// its summary: a job checks for at most 300 ms, a build takes 0.5 s.
const slowCommand = 10 * time.Second

// host is one simulated host: a `granary serve` node with its own state
// directory, which the soak kills and restarts.
type host struct {
	name, stateDir, logPath string
	bin                     string   // granary
	args                    []string // of granary serve
	env                     []string
	kills                   atomic.Int64 // how many times the soak killed the node

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{} // closed when cmd has been waited for
	killed  bool          // the soak killed cmd
	crashes []string      // exits the soak did not cause
}

// start starts the node (again), appending to its log.
func (h *host) start() error {
	logf, err := os.OpenFile(h.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(h.bin, h.args...)
	cmd.Env = h.env
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start the node of %s: %w", h.name, err)
	}
	exited := make(chan struct{})
	h.mu.Lock()
	h.cmd, h.exited, h.killed = cmd, exited, false
	h.mu.Unlock()
	go func() {
		err := cmd.Wait()
		logf.Close()
		h.mu.Lock()
		if !h.killed {
			h.crashes = append(h.crashes, fmt.Sprintf("pid %d: %v", cmd.Process.Pid, err))
		}
		h.mu.Unlock()
		close(exited)
	}()
	return nil
}

// waitReady waits until the node accepts connections on its local API
// socket (a killed node leaves the socket file behind, refusing).
func (h *host) waitReady(within time.Duration) error {
	h.mu.Lock()
	exited := h.exited
	h.mu.Unlock()
	deadline := time.Now().Add(within)
	for {
		c, err := net.DialTimeout("unix", agent.SocketPath(h.stateDir), time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("the node of %s exited at start (log: %s)", h.name, h.logPath)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the node of %s not ready within %v: %v (log: %s)", h.name, within, err, h.logPath)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill kills the node with SIGKILL and waits for it.
func (h *host) kill() {
	h.mu.Lock()
	cmd, exited := h.cmd, h.exited
	h.killed = true
	h.mu.Unlock()
	if cmd == nil {
		return
	}
	h.kills.Add(1)
	cmd.Process.Kill() //nolint:errcheck // it may have exited
	<-exited
}

// stuckGoroutines makes the node print where each of its goroutines is
// (on SIGQUIT, Go's runtime writes them to stderr, the node's log, and
// exits) and returns those that had been blocked for a minute or more in
// granary's code, without addresses: where a hung build or job waits.
func (h *host) stuckGoroutines() string {
	h.mu.Lock()
	cmd, exited := h.cmd, h.exited
	h.killed = true
	h.mu.Unlock()
	st, err := os.Stat(h.logPath)
	if err != nil {
		return err.Error()
	}
	cmd.Process.Signal(syscall.SIGQUIT) //nolint:errcheck // it may have exited
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill() //nolint:errcheck // it may have exited
		<-exited
	}
	b, err := os.ReadFile(h.logPath)
	if err != nil || int64(len(b)) < st.Size() {
		return fmt.Sprintf("cannot read the dump in %s: %v", h.logPath, err)
	}
	var out []string
	for _, g := range strings.Split(string(b[st.Size():]), "\n\n") {
		header, _, _ := strings.Cut(g, "\n")
		if strings.HasPrefix(header, "goroutine ") && strings.Contains(header, "minutes") && strings.Contains(g, "granary-build/granary/") {
			out = append(out, compactGoroutine(g))
		}
	}
	if len(out) == 0 {
		return "(none)"
	}
	return strings.Join(out, "\n")
}

// compactGoroutine is one goroutine of a dump on one line: its state and
// granary's frames, innermost first, as function file:line.
func compactGoroutine(g string) string {
	lines := strings.Split(g, "\n")
	state := lines[0]
	if i := strings.Index(state, "["); i >= 0 {
		state = strings.TrimSuffix(state[i:], ":")
	}
	const mod = "github.com/granary-build/granary/"
	var frames []string
	for i := 1; i+1 < len(lines); i += 2 {
		fn, file := strings.TrimSpace(lines[i]), strings.TrimSpace(lines[i+1])
		fn = strings.TrimPrefix(fn, "created by ")
		if !strings.HasPrefix(fn, mod) {
			continue
		}
		fn, _, _ = strings.Cut(strings.TrimPrefix(fn, mod), " in goroutine ")
		if m := funcName.FindStringSubmatch(fn); m != nil {
			fn = m[1]
		}
		file, _, _ = strings.Cut(file, " ")
		frames = append(frames, fn+" "+filepath.Base(file))
	}
	return state + " " + strings.Join(frames, " < ")
}

// funcName is a dump's function name without its arguments (a method's
// receiver, "(*T)", starts with '*'; arguments do not).
var funcName = regexp.MustCompile(`^(.+?)\((?:0x|\{|\)|\.\.\.|[0-9])`)

// pid is the node's current process ID.
func (h *host) pid() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.cmd.Process.Pid
}

// tally counts what the soak did and found; its methods are safe for
// concurrent use.
type tally struct {
	jobs, jobsStopped, jobsFailedCheck, jobErrors, jobsGaveUp atomic.Int64
	buildsRan, buildsFound, buildsWaited                      atomic.Int64
	failIntended, failNodeKilled, failLeaseLost               atomic.Int64
	removed, rmRefused, rmAbsent, rmErrors                    atomic.Int64
	gcSweeps, gcRemoved, gcErrors                             atomic.Int64
	invalidated, invAbsent, invErrors                         atomic.Int64
	needsFirst, failInvalidated                               atomic.Int64

	hungCount atomic.Int64

	mu       sync.Mutex
	hangs    []string // commands that did not finish within cmdTimeout
	faults   map[string]int
	notes    map[string][]string // a few examples of each kind of event
	counts   map[string]int      // how many of each kind
	failures []string            // unintended build failures
	problems []string            // the soak's own machinery failed
}

const keptNotes = 5

func (t *tally) note(kind, msg string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.notes == nil {
		t.notes, t.counts = map[string][]string{}, map[string]int{}
	}
	t.counts[kind]++
	if len(t.notes[kind]) < keptNotes {
		t.notes[kind] = append(t.notes[kind], msg)
	}
}

func (t *tally) failure(msg string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.failures = append(t.failures, msg)
}

func (t *tally) hung(msg string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.hangs = append(t.hangs, msg)
}

func (t *tally) harness(msg string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.problems = append(t.problems, msg)
}

func (t *tally) fault(name string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.faults == nil {
		t.faults = map[string]int{}
	}
	t.faults[name]++
}
