package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/node"
)

// agent measures the host agent: IncRef+DecRef pairs through node.Conns
// (one Conn per caller, as processes would hold them) on a package the
// host already holds, at each hot-path concurrency, next to the direct
// store's figures of the hot path scenario in the same run; then, if
// Config.Run is set, the wall time of a warm `granary run ID -- true` (the
// process start included) and the etcd revisions it costs, through the
// agent and with a direct store ($GRANARY_AGENT=off).
func (r *run) agent(ctx context.Context) error {
	const id = "agent-hot"
	s, cli, err := r.store(ctx, "agent-host")
	if err != nil {
		return err
	}
	if err := s.Handle(id).BuildContext(ctx, func(context.Context) error { return nil }); err != nil {
		return err
	}
	state, err := os.MkdirTemp("", "gb") // short: unix socket paths are limited
	if err != nil {
		return err
	}
	defer os.RemoveAll(state)
	cfg := node.DefaultConfig()
	cfg.StateDir, cfg.Root, cfg.Prefix, cfg.Name = state, r.root, r.prefix, "agent-host"
	cfg.OpTimeout, cfg.TTL = r.cfg.OpTimeout, r.z.TTL
	api, err := node.NewLocalAPI(s, cfg, nil)
	if err != nil {
		return err
	}
	actx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- api.Run(actx) }()
	defer func() {
		stop()
		<-served
		s.Close() //nolint:errcheck // revokes the lease: the host's lingering reference goes with it
	}()

	// Warm: the host takes its etcd reference once; it lingers (5 s)
	// between the pairs below.
	warm, err := node.Connect(ctx, state)
	if err != nil {
		return err
	}
	defer warm.Close()
	if err := warm.Handle(id).IncRefContext(ctx); err != nil {
		return err
	}

	n := r.z.HotPairs * r.z.HotRounds
	for _, c := range r.z.HotConcurrency {
		conns := make([]*node.Conn, c)
		for i := range conns {
			if conns[i], err = node.Connect(ctx, state); err != nil {
				return err
			}
		}
		pair := func(ctx context.Context, i int) (time.Duration, error) {
			h := conns[i%c].Handle(id)
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
		r.res[fmt.Sprintf("agent_ops_per_s_c%d", c)] = rate
		r.res[fmt.Sprintf("agent_pair_p50_us_c%d", c)] = float64(quantile(lats, 0.5)) / float64(time.Microsecond)
		r.res[fmt.Sprintf("agent_pair_p99_us_c%d", c)] = float64(quantile(lats, 0.99)) / float64(time.Microsecond)
		r.res[fmt.Sprintf("agent_etcd_writes_per_pair_c%d", c)] = float64(cnt.Writes) / float64(n)
		direct := r.res[fmt.Sprintf("hotpath_ops_per_s_c%d", c)]
		if direct > 0 {
			r.res[fmt.Sprintf("agent_vs_direct_c%d", c)] = rate / direct
		}
		r.logf("  c=%d: through the agent %.0f pairs/s (direct store %.0f), p50 %.0f µs, etcd writes per pair %.3f",
			c, rate, direct, r.res[fmt.Sprintf("agent_pair_p50_us_c%d", c)], r.res[fmt.Sprintf("agent_etcd_writes_per_pair_c%d", c)])
		floor, floorP50, err := r.socketFloor(ctx, c, n)
		if err != nil {
			return err
		}
		r.res[fmt.Sprintf("socket_floor_ops_per_s_c%d", c)] = floor
		r.res[fmt.Sprintf("socket_floor_pair_p50_us_c%d", c)] = float64(floorP50) / float64(time.Microsecond)
		r.logf("  c=%d: the floor, two bare round trips on a unix socket: %.0f pairs/s, p50 %.0f µs (the agent reaches %.0f %% of it)",
			c, floor, r.res[fmt.Sprintf("socket_floor_pair_p50_us_c%d", c)], 100*rate/floor)
	}
	if r.cfg.Run == nil {
		return nil
	}
	jobs := max(r.z.HotRounds*7, 3)
	// The floor: this program's start and exit (`granary help`).
	var floor []time.Duration
	for range jobs + 1 {
		cmd := r.cfg.Run(ctx, []string{"help"}, nil)
		t := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("granary help: %w: %s", err, out)
		}
		floor = append(floor, time.Since(t))
	}
	r.res["run_floor_wall_p50_ms"] = ms(quantile(floor[1:], 0.5))
	r.logf("  granary help (process start and exit, the floor): p50 %.1f ms", r.res["run_floor_wall_p50_ms"])
	for _, mode := range []struct{ name, env string }{{"agent", ""}, {"direct", "off"}} {
		args := []string{"run", "--root", r.root, "--state-dir", state, "--prefix", r.prefix,
			"--ttl", strconv.Itoa(int(r.z.TTL / time.Second)), id, "--", "true"}
		env := []string{"GRANARY_AGENT=" + mode.env}
		job := func() (time.Duration, error) {
			cmd := r.cfg.Run(ctx, args, env)
			t := time.Now()
			out, err := cmd.CombinedOutput()
			if err != nil {
				return 0, fmt.Errorf("granary run (%s): %w: %s", mode.name, err, out)
			}
			return time.Since(t), nil
		}
		if _, err := job(); err != nil { // warm the page cache
			return err
		}
		rev0, err := revision(ctx, r, cli)
		if err != nil {
			return err
		}
		var walls []time.Duration
		for range jobs {
			d, err := job()
			if err != nil {
				return err
			}
			walls = append(walls, d)
		}
		rev1, err := revision(ctx, r, cli)
		if err != nil {
			return err
		}
		r.res["run_"+mode.name+"_wall_p50_ms"] = ms(quantile(walls, 0.5))
		r.res["run_"+mode.name+"_wall_p90_ms"] = ms(quantile(walls, 0.9))
		r.res["run_"+mode.name+"_etcd_revisions_per_job"] = float64(rev1-rev0) / float64(jobs)
		r.logf("  granary run -- true (%s): p50 %.1f ms, p90 %.1f ms, etcd revisions per job %.2f over %d jobs",
			mode.name, r.res["run_"+mode.name+"_wall_p50_ms"], r.res["run_"+mode.name+"_wall_p90_ms"],
			r.res["run_"+mode.name+"_etcd_revisions_per_job"], jobs)
	}
	return nil
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
