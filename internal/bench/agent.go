package bench

import (
	"context"
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

// agent measures the host agent: IncRef+DecRef pairs through node.Conns
// (one Conn per caller, as processes would hold them) on a package the
// host already holds, at each hot-path concurrency, next to the direct
// store's figures of the hot path scenario in the same run; then, if
// Config.Run is set, the wall time of a warm `granary run ID -- true` (the
// process start included) and the etcd revisions it costs, through the
// agent and with a direct store ($GRANARY_AGENT=off), and, if
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

	// Warm: the host takes its etcd reference once; it lingers (5 s)
	// between the pairs below.
	warm, err := agent.Connect(ctx, state)
	if err != nil {
		return err
	}
	defer warm.Close()
	if err := warm.Handle(id).IncRefContext(ctx); err != nil {
		return err
	}

	for _, c := range r.z.HotConcurrency {
		if err := r.agentPairs(ctx, state, id, c, "agent"); err != nil {
			return err
		}
	}
	if r.cfg.Run == nil {
		return nil
	}
	if err := r.runFloors(ctx); err != nil {
		return err
	}
	return r.runJobs(ctx, cli, state, id)
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

// agentPairs measures warm IncRef+DecRef pairs through the node at c
// callers, each with a Conn of its own, as results named key_…; for the
// agent scenario (key "agent") next to the floor of two bare round trips
// on a unix socket.
func (r *run) agentPairs(ctx context.Context, state, id string, c int, key string) error {
	n := r.z.HotPairs * r.z.HotRounds
	var err error
	conns := make([]*agent.Conn, c)
	for i := range conns {
		if conns[i], err = agent.Connect(ctx, state); err != nil {
			return err
		}
	}
	free := make(chan *agent.Conn, c)
	for _, cn := range conns {
		free <- cn
	}
	pair := func(ctx context.Context, i int) (time.Duration, error) {
		cn := <-free // one caller at a time per Conn, as a process's
		defer func() { free <- cn }()
		h := cn.Handle(id)
		t := time.Now()
		if err := h.IncRefContext(ctx); err != nil {
			return 0, err
		}
		err := h.DecRefContext(ctx)
		return time.Since(t), err
	}
	before := r.cnt.Snapshot()
	wall, lats, err := parallel(ctx, c, n, pair)
	for _, cn := range conns {
		cn.Close()
	}
	if err != nil {
		return err
	}
	cnt := r.cnt.Snapshot().Sub(before)
	rate := float64(n) / wall.Seconds()
	r.res[fmt.Sprintf("%s_ops_per_s_c%d", key, c)] = rate
	r.res[fmt.Sprintf("%s_pair_p50_us_c%d", key, c)] = float64(quantile(lats, 0.5)) / float64(time.Microsecond)
	r.res[fmt.Sprintf("%s_pair_p99_us_c%d", key, c)] = float64(quantile(lats, 0.99)) / float64(time.Microsecond)
	r.res[fmt.Sprintf("%s_etcd_writes_per_pair_c%d", key, c)] = float64(cnt.Writes) / float64(n)
	direct := r.res[fmt.Sprintf("hotpath_ops_per_s_c%d", c)]
	if direct > 0 {
		r.res[fmt.Sprintf("%s_vs_direct_c%d", key, c)] = rate / direct
	}
	r.logf("  c=%d: through the agent %.0f pairs/s (direct store %.0f), p50 %.0f µs, etcd writes per pair %.3f",
		c, rate, direct, r.res[fmt.Sprintf("%s_pair_p50_us_c%d", key, c)], r.res[fmt.Sprintf("%s_etcd_writes_per_pair_c%d", key, c)])
	if key != "agent" {
		return nil
	}
	floor, floorP50, err := r.socketFloor(ctx, c, n)
	if err != nil {
		return err
	}
	r.res[fmt.Sprintf("socket_floor_ops_per_s_c%d", c)] = floor
	r.res[fmt.Sprintf("socket_floor_pair_p50_us_c%d", c)] = float64(floorP50) / float64(time.Microsecond)
	r.logf("  c=%d: the floor, two bare round trips on a unix socket: %.0f pairs/s, p50 %.0f µs (the agent reaches %.0f %% of it)",
		c, floor, r.res[fmt.Sprintf("socket_floor_pair_p50_us_c%d", c)], 100*rate/floor)
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
