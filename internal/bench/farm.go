package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

// farm simulates H hosts in this process, each a store of its own (its own
// lease; the stores share a few etcd clients), running jobs over
// FarmPackages published packages picked with Zipf popularity: a job takes
// a reference (its "start"), holds it for FarmHold and drops it. In direct
// mode a job uses its host's store as a `granary run` with its own store
// would (IncRef, DecRef: the lease grant and revoke of a job's own store
// are not included, so direct mode is flattered). In agent mode each host
// runs the node's local API on its store and a job connects, takes and
// drops its reference and closes, as `granary run` through the node does.
// In agent mode every host first takes and drops every package once, and
// the linger (FarmLinger) outlasts the run: the steady state of a farm whose
// hosts start jobs more often than the linger. FarmWarmup jobs then run
// unmeasured in both modes. Reported per H and
// mode: etcd writes per job start and the job-start latency p50/p99.
func (r *run) farm(ctx context.Context) error {
	if len(r.z.FarmHosts) == 0 {
		return nil
	}
	ids := make([]string, r.z.FarmPackages)
	builder, _, err := r.store(ctx, "farm-builder")
	if err != nil {
		return err
	}
	for i := range ids {
		ids[i] = "farm-" + strconv.Itoa(i)
		if err := builder.Handle(ids[i]).BuildContext(ctx, func(context.Context) error { return nil }); err != nil {
			return err
		}
	}
	var clis []*clientv3.Client
	for range 4 {
		cli, err := r.client()
		if err != nil {
			return err
		}
		clis = append(clis, cli)
	}
	for _, h := range r.z.FarmHosts {
		for _, mode := range []string{"direct", "agent"} {
			if err := r.farmRun(ctx, h, mode, ids, clis); err != nil {
				return fmt.Errorf("H=%d %s: %w", h, mode, err)
			}
		}
	}
	return nil
}

// farmHost is one simulated host.
type farmHost struct {
	s     *etcdstore.Store
	state string // agent mode: its state directory
	stop  func()
}

func (r *run) farmRun(ctx context.Context, h int, mode string, ids []string, clis []*clientv3.Client) error {
	hosts := make([]*farmHost, h)
	defer func() {
		for _, fh := range hosts {
			if fh == nil {
				continue
			}
			if fh.stop != nil {
				fh.stop()
			}
			fh.s.Close() //nolint:errcheck // revokes its lease
			if fh.state != "" {
				os.RemoveAll(fh.state)
			}
		}
	}()
	for i := range hosts {
		name := fmt.Sprintf("farm-%s-%d", mode, i)
		s, err := etcdstore.New(ctx, clis[i%len(clis)], r.root, r.storeOptions(name)...)
		if err != nil {
			return err
		}
		fh := &farmHost{s: s}
		hosts[i] = fh
		if mode != "agent" {
			continue
		}
		if fh.state, err = os.MkdirTemp("", "gf"); err != nil {
			return err
		}
		cfg := node.DefaultConfig()
		cfg.StateDir, cfg.Root, cfg.Prefix, cfg.Name = fh.state, r.root, r.prefix, name
		cfg.OpTimeout, cfg.TTL, cfg.Linger = r.cfg.OpTimeout, r.z.TTL, r.z.FarmLinger
		api, err := node.NewLocalAPI(s, cfg, nil)
		if err != nil {
			return err
		}
		actx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- api.Run(actx) }()
		fh.stop = func() { cancel(); <-done }
	}
	zipf := rand.NewZipf(rand.New(rand.NewPCG(uint64(h), 12)), 1.1, 1, uint64(len(ids)-1))
	type pick struct{ host, pkg int }
	total := r.z.FarmWarmup + r.z.FarmJobs
	picks := make([]pick, total)
	rng := rand.New(rand.NewPCG(uint64(h), 34))
	for i := range picks {
		picks[i] = pick{rng.IntN(h), int(zipf.Uint64())}
	}
	job := func(ctx context.Context, i int) (time.Duration, error) {
		p := picks[i]
		fh, id := hosts[p.host], ids[p.pkg]
		t := time.Now()
		if mode == "direct" {
			hd := fh.s.Handle(id)
			if err := hd.IncRefContext(ctx); err != nil {
				return 0, err
			}
			start := time.Since(t)
			time.Sleep(r.z.FarmHold)
			return start, hd.DecRefContext(ctx)
		}
		c, err := node.Connect(ctx, fh.state)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		hd := c.Handle(id)
		if err := hd.IncRefContext(ctx); err != nil {
			return 0, err
		}
		start := time.Since(t)
		time.Sleep(r.z.FarmHold)
		return start, hd.DecRefContext(ctx)
	}
	if mode == "agent" {
		// Steady state: every host holds every package (a farm whose hosts
		// run jobs more often than the linger). One Conn per host touches
		// each package once; the linger outlasts the run.
		touch := func(ctx context.Context, i int) (time.Duration, error) {
			c, err := node.Connect(ctx, hosts[i].state)
			if err != nil {
				return 0, err
			}
			defer c.Close()
			for _, id := range ids {
				if err := c.Handle(id).IncRefContext(ctx); err != nil {
					return 0, err
				}
				if err := c.Handle(id).DecRefContext(ctx); err != nil {
					return 0, err
				}
			}
			return 0, nil
		}
		if _, _, err := parallel(ctx, r.z.FarmConcurrency, h, touch); err != nil {
			return err
		}
	}
	if _, _, err := parallel(ctx, r.z.FarmConcurrency, r.z.FarmWarmup, job); err != nil {
		return err
	}
	measured := func(ctx context.Context, i int) (time.Duration, error) { return job(ctx, r.z.FarmWarmup+i) }
	before := r.cnt.Snapshot()
	wall, lats, err := parallel(ctx, r.z.FarmConcurrency, r.z.FarmJobs, measured)
	if err != nil {
		return err
	}
	cnt := r.cnt.Snapshot().Sub(before)
	jobs := float64(r.z.FarmJobs)
	key := fmt.Sprintf("farm_%s_h%d_", mode, h)
	r.res[key+"etcd_writes_per_job"] = float64(cnt.Writes) / jobs
	r.res[key+"etcd_writes_per_s"] = float64(cnt.Writes) / wall.Seconds()
	r.res[key+"jobs_per_s"] = jobs / wall.Seconds()
	r.res[key+"start_p50_ms"] = ms(quantile(lats, 0.5))
	r.res[key+"start_p99_ms"] = ms(quantile(lats, 0.99))
	r.logf("  H=%d %s: %.0f jobs/s, etcd writes %.3f per job (%.0f/s), job start p50 %.2f ms p99 %.2f ms",
		h, mode, jobs/wall.Seconds(), r.res[key+"etcd_writes_per_job"], r.res[key+"etcd_writes_per_s"],
		r.res[key+"start_p50_ms"], r.res[key+"start_p99_ms"])
	return nil
}
