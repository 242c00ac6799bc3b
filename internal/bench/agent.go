package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

// agent measures the host agent: IncRef+DecRef pairs through agent.Conns
// (one Conn per caller, as processes would hold them) on a package the
// host already holds, at each hot-path concurrency, against a node in this
// process and against a node of its own process (`granary serve`), each
// next to the floor of two bare round trips on a unix socket to an echo
// server in the same place (this process; a process of its own), and next
// to the direct store's figures of the hot path scenario in the same run;
// then, if Config.Run is set, the wall time of a warm `granary run ID --
// true` (the process start included) and the etcd revisions it costs,
// through the agent and with a direct store ($GRANARY_AGENT=off), and, if
// Config.RunLight is set, of `granary-run ID -- true` through the agent;
// next to the floors of process start: `granary help`, `granary-run
// --version` and `true`.
func (r *run) agent(ctx context.Context) error {
	const id = "agent-hot"
	s, cli, err := r.store(ctx, "agent-host")
	if err != nil {
		return err
	}
	if err := s.Handle(id).BuildContext(ctx, func(context.Context) error { return nil }); err != nil {
		return err
	}
	state, stop, err := r.localAPI(ctx, s, "agent-host")
	if err != nil {
		return err
	}
	defer func() {
		stop()
		s.Close() //nolint:errcheck // revokes the lease: the host's lingering reference goes with it
	}()
	targets, stopProcs, err := r.agentTargets(ctx, cli, state, id)
	if err != nil {
		return err
	}
	for _, c := range r.z.HotConcurrency {
		if err := r.agentLevel(ctx, c, targets); err != nil {
			stopProcs() //nolint:errcheck // the level's error is the cause
			return err
		}
	}
	if err := stopProcs(); err != nil {
		return err
	}
	if r.cfg.Run == nil {
		return nil
	}
	if err := r.runFloors(ctx); err != nil {
		return err
	}
	return r.runJobs(ctx, cli, state, id)
}

// pairTarget is one of the agent scenario's pair measurements: where the
// callers connect, and how its etcd writes are counted.
type pairTarget struct {
	key  string // results' prefix
	what string // for the progress lines
	open opener
	// writes, if set, counts etcd writes so far (its difference over the
	// pairs is the target's writes), named writesKey in the results.
	writes    func(context.Context) (int64, error)
	writesKey string
}

// agentTargets warms the agent scenario's nodes on id (each takes the
// host's etcd reference once, then holds it through a Conn that stays
// open) and returns its pair measurements: the node in this process on
// state, the floor in this process, and, with a way to start processes
// (Config.Run, Config.Child), a node and a floor of their own processes.
// stop ends those processes and the warm Conns.
func (r *run) agentTargets(ctx context.Context, cli *clientv3.Client, state, id string) (ts []pairTarget, stop func() error, err error) {
	var stops []func() error
	stop = func() error {
		var errs []error
		for i := len(stops) - 1; i >= 0; i-- {
			errs = append(errs, stops[i]())
		}
		return errors.Join(errs...)
	}
	defer func() {
		if err != nil {
			stop() //nolint:errcheck // err is the cause
		}
	}()
	warm := func(state string) error {
		c, err := agent.Connect(ctx, state)
		if err == nil {
			stops = append(stops, c.Close)
			err = c.Handle(id).IncRefContext(ctx)
		}
		return err
	}
	if err := warm(state); err != nil {
		return nil, nil, err
	}
	floor, stopFloor, err := echoInProcess()
	if err != nil {
		return nil, nil, err
	}
	stops = append(stops, func() error { stopFloor(); return nil })
	counted := func(context.Context) (int64, error) { return r.cnt.Snapshot().Writes, nil }
	ts = append(ts,
		pairTarget{key: "agent", what: "through a node in this process", open: agentOpener(state, id), writes: counted, writesKey: "etcd_writes_per_pair"},
		pairTarget{key: "socket_floor", what: "the floor in this process, two bare round trips on a unix socket", open: floorOpener(floor)})

	nstate, np, serve, err := r.nodeProcess(ctx, "agent-proc")
	if err != nil || np == nil {
		return ts, stop, err
	}
	stops = append(stops, np.stop)
	r.res["agent_proc_granary_serve"] = 0 // 1: the node is `granary serve`; 0: a bench child
	if serve {
		r.res["agent_proc_granary_serve"] = 1
	}
	if err := warm(nstate); err != nil {
		return nil, nil, err
	}
	echo, ep, err := r.echoProcess(ctx)
	if err != nil {
		return nil, nil, err
	}
	revs := func(ctx context.Context) (int64, error) { return revision(ctx, r, cli) }
	ts = append(ts, pairTarget{key: "agent_proc", what: "through " + np.what + " (a process of its own)", open: agentOpener(nstate, id), writes: revs, writesKey: "etcd_revisions_per_pair"})
	if ep != nil {
		stops = append(stops, ep.stop)
		ts = append(ts, pairTarget{key: "socket_floor_proc", what: "the floor in a process of its own", open: floorOpener(echo)})
	}
	return ts, stop, nil
}

// agentOpener returns the connections of pairs through the node serving
// state: an agent.Conn each, whose pair is IncRef then DecRef of id.
func agentOpener(state, id string) opener {
	return func(ctx context.Context) (connPair, func(), error) {
		cn, err := agent.Connect(ctx, state)
		if err != nil {
			return nil, nil, err
		}
		h := cn.Handle(id)
		pair := func(ctx context.Context) error {
			if err := h.IncRefContext(ctx); err != nil {
				return err
			}
			return h.DecRefContext(ctx)
		}
		return pair, func() { cn.Close() }, nil
	}
}

// agentLevel measures the targets at c callers over HotRounds rounds,
// alternating them within each round (HotPairs pairs each) so that load
// from other processes hits them alike, and records each target's rate,
// latency quantiles and etcd writes per pair, the ratio of the agent to
// the floor in the same place, and the agent's to the direct store's.
func (r *run) agentLevel(ctx context.Context, c int, ts []pairTarget) error {
	type acc struct {
		wall   time.Duration
		lats   []time.Duration
		writes int64
	}
	accs := make([]acc, len(ts))
	for range r.z.HotRounds {
		for i, t := range ts {
			var w0 int64
			var err error
			if t.writes != nil {
				if w0, err = t.writes(ctx); err != nil {
					return err
				}
			}
			wall, lats, err := pairs(ctx, c, r.z.HotPairs, t.open)
			if err != nil {
				return fmt.Errorf("%s: %w", t.what, err)
			}
			if t.writes != nil {
				w1, err := t.writes(ctx)
				if err != nil {
					return err
				}
				accs[i].writes += w1 - w0
			}
			accs[i].wall += wall
			accs[i].lats = append(accs[i].lats, lats...)
		}
	}
	for i, t := range ts {
		n := len(accs[i].lats)
		r.recordPairs(t.key, c, n, accs[i].wall, accs[i].lats)
		line := fmt.Sprintf("  c=%d: %s: %.0f pairs/s, p50 %.0f µs", c, t.what, r.res[fmt.Sprintf("%s_ops_per_s_c%d", t.key, c)], r.res[fmt.Sprintf("%s_pair_p50_us_c%d", t.key, c)])
		if t.writes != nil {
			r.res[fmt.Sprintf("%s_%s_c%d", t.key, t.writesKey, c)] = float64(accs[i].writes) / float64(n)
			line += fmt.Sprintf(", %s %.3f", strings.ReplaceAll(t.writesKey, "_", " "), float64(accs[i].writes)/float64(n))
		}
		r.logf("%s", line)
	}
	r.agentRatios(c)
	return nil
}

// recordPairs records a pair measurement as results key_…_cC.
func (r *run) recordPairs(key string, c, n int, wall time.Duration, lats []time.Duration) {
	r.res[fmt.Sprintf("%s_ops_per_s_c%d", key, c)] = float64(n) / wall.Seconds()
	r.res[fmt.Sprintf("%s_pair_p50_us_c%d", key, c)] = float64(quantile(lats, 0.5)) / float64(time.Microsecond)
	r.res[fmt.Sprintf("%s_pair_p99_us_c%d", key, c)] = float64(quantile(lats, 0.99)) / float64(time.Microsecond)
}

// agentRatios records the agent's rate at c callers over the floor's in
// the same place (agent_floor_ratio: both in processes of their own, the
// headline; agent_inproc_floor_ratio: both in this process) and over the
// direct store's.
func (r *run) agentRatios(c int) {
	at := func(key string) float64 { return r.res[fmt.Sprintf("%s_ops_per_s_c%d", key, c)] }
	for _, q := range []struct{ ratio, agent, floor string }{
		{"agent_inproc_floor_ratio", "agent", "socket_floor"},
		{"agent_floor_ratio", "agent_proc", "socket_floor_proc"},
		{"agent_vs_direct", "agent", "hotpath"},
	} {
		if a, f := at(q.agent), at(q.floor); a > 0 && f > 0 {
			r.res[fmt.Sprintf("%s_c%d", q.ratio, c)] = a / f
		}
	}
	r.logf("  c=%d: the agent reaches %.2f× the floor in this process, %.2f× the floor between processes",
		c, r.res[fmt.Sprintf("agent_inproc_floor_ratio_c%d", c)], r.res[fmt.Sprintf("agent_floor_ratio_c%d", c)])
}

// localAPI serves the host agent's socket for s, as a node named name
// does, in a fresh state directory; stop ends it and removes the directory.
func (r *run) localAPI(ctx context.Context, s *etcdstore.Store, name string) (state string, stop func(), err error) {
	state, err = os.MkdirTemp("", "gb") // short: unix socket paths are limited
	if err != nil {
		return "", nil, err
	}
	cfg := node.DefaultConfig()
	cfg.StateDir, cfg.Root, cfg.Prefix, cfg.Name = state, r.root, r.prefix, name
	cfg.OpTimeout, cfg.TTL = r.cfg.OpTimeout, r.z.TTL
	api, err := node.NewLocalAPI(s, cfg, nil)
	if err != nil {
		os.RemoveAll(state)
		return "", nil, err
	}
	actx, cancel := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- api.Run(actx) }()
	return state, func() { cancel(); <-served; os.RemoveAll(state) }, nil
}

// agentPairs measures warm IncRef+DecRef pairs through the node serving
// state at c callers, each with a Conn of its own, as results named
// key_…_cC, with the etcd writes per pair.
func (r *run) agentPairs(ctx context.Context, state, id string, c int, key string) error {
	n := r.z.HotPairs * r.z.HotRounds
	before := r.cnt.Snapshot()
	wall, lats, err := pairs(ctx, c, n, agentOpener(state, id))
	if err != nil {
		return err
	}
	cnt := r.cnt.Snapshot().Sub(before)
	r.recordPairs(key, c, n, wall, lats)
	r.res[fmt.Sprintf("%s_etcd_writes_per_pair_c%d", key, c)] = float64(cnt.Writes) / float64(n)
	r.logf("  c=%d: through the agent %.0f pairs/s, p50 %.0f µs, etcd writes per pair %.3f",
		c, r.res[fmt.Sprintf("%s_ops_per_s_c%d", key, c)], r.res[fmt.Sprintf("%s_pair_p50_us_c%d", key, c)], float64(cnt.Writes)/float64(n))
	return nil
}

// runFloors times the floors of a job's process start: the full binary's
// start and exit (`granary help`), the light launcher's (`granary-run
// --version`), and /bin/true's.
func (r *run) runFloors(ctx context.Context) error {
	jobs := max(r.z.HotRounds*7, 3)
	// The floors: the full binary's start and exit (`granary help`), the
	// light launcher's (`granary-run --version`), and /bin/true's.
	floors := []struct {
		key, what string
		cmd       func() *exec.Cmd
	}{
		{"run_floor_wall_p50_ms", "granary help", func() *exec.Cmd { return r.cfg.Run(ctx, []string{"help"}, nil) }},
		{"run_light_floor_wall_p50_ms", "granary-run --version", func() *exec.Cmd { return r.cfg.RunLight(ctx, []string{"--version"}, nil) }},
		{"run_true_floor_wall_p50_ms", "true", func() *exec.Cmd { return exec.CommandContext(ctx, "true") }},
	}
	for _, f := range floors {
		if f.key == "run_light_floor_wall_p50_ms" && r.cfg.RunLight == nil {
			continue
		}
		if _, err := timeJobs(1, f.what, f.cmd); err != nil { // warm the page cache
			return err
		}
		walls, err := timeJobs(jobs, f.what, f.cmd)
		if err != nil {
			return err
		}
		r.res[f.key] = ms(quantile(walls, 0.5))
		r.logf("  %s (process start and exit, a floor): p50 %.1f ms", f.what, r.res[f.key])
	}
	return nil
}

// runJobs times a warm `granary run ID -- true` through the agent and
// with a direct store, and `granary-run ID -- true`, with the etcd
// revisions each costs.
func (r *run) runJobs(ctx context.Context, cli *clientv3.Client, state, id string) error {
	jobs := max(r.z.HotRounds*7, 3)
	ttl := strconv.Itoa(int(r.z.TTL / time.Second))
	type runMode struct {
		name, what string
		cmd        func(argv ...string) *exec.Cmd // the job running argv
	}
	modes := []runMode{
		{"agent", "granary run", func(argv ...string) *exec.Cmd {
			return r.cfg.Run(ctx, append([]string{"run", "--root", r.root, "--state-dir", state, "--prefix", r.prefix, "--ttl", ttl, id, "--"}, argv...), []string{"GRANARY_AGENT="})
		}},
		{"direct", "granary run", func(argv ...string) *exec.Cmd {
			return r.cfg.Run(ctx, append([]string{"run", "--root", r.root, "--state-dir", state, "--prefix", r.prefix, "--ttl", ttl, id, "--"}, argv...), []string{"GRANARY_AGENT=off"})
		}},
	}
	if r.cfg.RunLight != nil {
		modes = append(modes, runMode{"light", "granary-run", func(argv ...string) *exec.Cmd {
			// Only the flags granary-run knows: any other hands the job to
			// the full binary.
			return r.cfg.RunLight(ctx, append([]string{"--root", r.root, "--state-dir", state, "--prefix", r.prefix, id, "--"}, argv...), []string{"GRANARY_AGENT="})
		}})
	}
	for _, mode := range modes {
		if mode.name == "light" {
			// The job must run under granary-run itself, not under the full
			// binary it hands jobs to when it cannot do them.
			out, err := mode.cmd("sh", "-c", "cat /proc/$PPID/comm").CombinedOutput()
			if err != nil || strings.TrimSpace(string(out)) != "granary-run" {
				return fmt.Errorf("granary-run did not run the job itself (its command's parent is %q, %v)", strings.TrimSpace(string(out)), err)
			}
		}
		job := func() *exec.Cmd { return mode.cmd("true") }
		if _, err := timeJobs(1, mode.what, job); err != nil { // warm the page cache
			return err
		}
		rev0, err := revision(ctx, r, cli)
		if err != nil {
			return err
		}
		walls, err := timeJobs(jobs, mode.what, job)
		if err != nil {
			return err
		}
		rev1, err := revision(ctx, r, cli)
		if err != nil {
			return err
		}
		r.res["run_"+mode.name+"_wall_p50_ms"] = ms(quantile(walls, 0.5))
		r.res["run_"+mode.name+"_wall_p90_ms"] = ms(quantile(walls, 0.9))
		r.res["run_"+mode.name+"_etcd_revisions_per_job"] = float64(rev1-rev0) / float64(jobs)
		r.logf("  %s -- true (%s): p50 %.1f ms, p90 %.1f ms, etcd revisions per job %.2f over %d jobs",
			mode.what, mode.name, r.res["run_"+mode.name+"_wall_p50_ms"], r.res["run_"+mode.name+"_wall_p90_ms"],
			r.res["run_"+mode.name+"_etcd_revisions_per_job"], jobs)
	}
	return nil
}

// timeJobs runs n commands made by cmd, one after the other, and returns
// the wall time of each (from start to exit).
func timeJobs(n int, what string, cmd func() *exec.Cmd) ([]time.Duration, error) {
	var walls []time.Duration
	for range n {
		c := cmd()
		t := time.Now()
		out, err := c.CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("%s: %w: %s", what, err, out)
		}
		walls = append(walls, time.Since(t))
	}
	return walls, nil
}

// revision is etcd's current revision: it grows by one per write
// (transaction, put, delete), not for lease grants, keep-alives or
// revocations of leases without keys.
func revision(ctx context.Context, r *run, cli *clientv3.Client) (int64, error) {
	cctx, cancel := r.opCtx(ctx)
	defer cancel()
	resp, err := cli.Get(cctx, r.prefix+"revision-probe", clientv3.WithCountOnly())
	if err != nil {
		return 0, err
	}
	return resp.Header.Revision, nil
}

// runCommand is the type of Config.Run.
type runCommand = func(ctx context.Context, args, env []string) *exec.Cmd
