package bench_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/granary-build/granary/internal/bench"
	"github.com/granary-build/granary/internal/etcdtest"
)

func tinyConfig(t *testing.T, srv *etcdtest.Server, child bool) bench.Config {
	cfg := bench.Config{
		Sizes: bench.TinySizes(),
		NewClient: func(extra ...grpc.DialOption) (*clientv3.Client, error) {
			cc := etcdtest.ClientConfig(srv.Endpoint)
			cc.DialOptions = append(cc.DialOptions, extra...)
			return clientv3.New(cc)
		},
		Dir:      t.TempDir(),
		Progress: tlog{t},
	}
	if child {
		cfg.Child = func(ctx context.Context, args []string) *exec.Cmd {
			a, _ := json.Marshal(args)
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), childEnv+"="+string(a), "BENCH_ENDPOINT="+srv.Endpoint)
			return cmd
		}
	}
	return cfg
}

type tlog struct{ t *testing.T }

func (l tlog) Write(p []byte) (int, error) { l.t.Log(string(p)); return len(p), nil }

// TestRunTiny runs every scenario on a token amount of work, with the
// memory scenarios in child processes, and checks what the scenarios
// count, not how fast they were.
func TestRunTiny(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := tinyConfig(t, srv, true)
	rep, err := bench.Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	z := cfg.Sizes
	for _, key := range []string{
		"hotpath_ops_per_s", "hotpath_raw_ops_per_s", "hotpath_ratio", "hotpath_ops_per_s_c1", "hotpath_ops_per_s_c4",
		"hotpath_p50_ms", "hotpath_p99_ms", "hotpath_raw_put_p99_ms", "hotpath_same_ratio_c4", "hotpath_cpu_us_per_pair_c4",
		"waiters_release_p50_ms", "waiters_release_p99_ms", "stampede_overhead_ms", "stampede_builds",
		"distinct_builds_per_s", "distinct_etcd_writes_per_build", "takeover_s", "ttl_s",
		"prune_300_s", "prune_peak_rss_mb", "node_rss_mb_50_refs",
		"needs_0_ops_per_s_c4", "needs_20_ops_per_s_c4", "needs_20_agent_ops_per_s_c4", "prune_300_needs_s",
	} {
		if _, ok := rep.Results[key]; !ok {
			t.Errorf("result %q missing", key)
		}
	}
	checks := []struct {
		name      string
		got, want float64
	}{
		{"stampede_builds", rep.Results["stampede_builds"], 1},
		{"stampede_calls", rep.Results["stampede_calls"], float64(z.StampedeCalls)},
		// IncRef+DecRef is two etcd requests, as the raw baseline is.
		{"hotpath_etcd_requests_per_pair_c4", rep.Results["hotpath_etcd_requests_per_pair_c4"], 2},
		{"hotpath_raw_etcd_requests_per_pair_c4", rep.Results["hotpath_raw_etcd_requests_per_pair_c4"], 2},
		{"hotpath_raw_same_etcd_requests_per_pair_c4", rep.Results["hotpath_raw_same_etcd_requests_per_pair_c4"], 2},
		// An uncontended build: lock Txn, record Txn, publish Txn.
		{"distinct_etcd_writes_per_build", rep.Results["distinct_etcd_writes_per_build"], 3},
		{"prune_300_removed", rep.Results["prune_300_removed"], float64(z.PruneMaxRemovals)},
		{"waiters_count", rep.Results["waiters_count"], float64(z.WaiterStores * z.WaiterCounts[0])},
		{"ttl_s", rep.Results["ttl_s"], z.TTL.Seconds()},
		{"prune_300_needs_removed", rep.Results["prune_300_needs_removed"], float64(z.PruneMaxRemovals)},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	// Direct, a pair is two writes and a removal four requests (lock,
	// read, remove Txn, unlock) whatever the needs. The counter also sees
	// the run's stray background requests (a publish's clean-up), hence
	// the margin; a request per need would add 20.
	for _, c := range []struct {
		key  string
		want float64
	}{
		{"needs_0_etcd_writes_per_pair", 2}, {"needs_20_etcd_writes_per_pair", 2},
		{"needs_0_remove_etcd_requests", 4}, {"needs_20_remove_etcd_requests", 4},
	} {
		if got := rep.Results[c.key]; got < c.want || got > c.want+1 {
			t.Errorf("%s = %v, want %v (at most %v with stray requests)", c.key, got, c.want, c.want+1)
		}
	}
	// Needs change nothing in a reference's cost: no etcd write through a
	// warm agent (direct and removals, above). The counter sees the whole
	// store, so one stray background write of the setup (a deferred
	// delete on a loaded machine) is let through; a write per pair is not.
	pairs := float64(z.HotPairs * z.HotRounds)
	if got := rep.Results["needs_20_agent_etcd_writes_per_pair_c4"] * pairs; got > 1 {
		t.Errorf("etcd writes of %v warm pairs with 20 needs through the agent = %v, want 0 (at most 1 stray)", pairs, got)
	}
	// The agent's pairs and their floors, in this process and between
	// processes (the node here is the test binary's child: no granary
	// program), at every level; a warm pair writes nothing to etcd.
	for _, c := range z.HotConcurrency {
		for _, key := range []string{"agent", "socket_floor", "agent_proc", "socket_floor_proc"} {
			for _, m := range []string{"ops_per_s", "pair_p50_us", "pair_p99_us"} {
				if k := fmt.Sprintf("%s_%s_c%d", key, m, c); rep.Results[k] <= 0 {
					t.Errorf("%s = %v, want > 0", k, rep.Results[k])
				}
			}
		}
		for _, k := range []string{"agent_floor_ratio", "agent_inproc_floor_ratio"} {
			if k := fmt.Sprintf("%s_c%d", k, c); rep.Results[k] <= 0 {
				t.Errorf("%s = %v, want > 0", k, rep.Results[k])
			}
		}
		for _, k := range []string{"agent_etcd_writes_per_pair", "agent_proc_etcd_revisions_per_pair"} {
			k = fmt.Sprintf("%s_c%d", k, c)
			if v, ok := rep.Results[k]; !ok || v != 0 {
				t.Errorf("%s = %v (measured: %v), want 0", k, v, ok)
			}
		}
	}
	if v, ok := rep.Results["agent_proc_granary_serve"]; !ok || v != 0 {
		t.Errorf("agent_proc_granary_serve = %v (%v), want 0: no granary program here", v, ok)
	}
	if rep.Results["node_rss_mb_50_refs"] <= 0 || rep.Results["prune_peak_rss_mb"] <= 0 {
		t.Errorf("RSS not measured in the child: %v, %v", rep.Results["node_rss_mb_50_refs"], rep.Results["prune_peak_rss_mb"])
	}
	if rep.Results["takeover_s"] < z.TTL.Seconds()/3 {
		t.Errorf("takeover after %.2fs: before the dead lease could have been doubted", rep.Results["takeover_s"])
	}
	if len(rep.Goals) == 0 {
		t.Error("no goals evaluated")
	}
	png, err := bench.Chart(rep)
	if err != nil || len(png) < 8 || string(png[1:4]) != "PNG" {
		t.Errorf("Chart: %d bytes, %v", len(png), err)
	}
	// The run cleaned up after itself.
	cli := srv.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/granary-bench-", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != 0 {
		t.Errorf("%d keys left under /granary-bench-", resp.Count)
	}
	if ents, _ := os.ReadDir(cfg.Dir); len(ents) != 0 {
		t.Errorf("%d entries left in %s", len(ents), cfg.Dir)
	}
}

// TestSizesValidate rejects sizes that cannot run.
func TestSizesValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*bench.Sizes)
	}{
		{"no hot pairs", func(z *bench.Sizes) { z.HotPairs = 0 }},
		{"zero concurrency", func(z *bench.Sizes) { z.HotConcurrency = []int{0} }},
		{"short TTL", func(z *bench.Sizes) { z.TTL = 1 }},
		{"no prune sizes", func(z *bench.Sizes) { z.PrunePackages = nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			z := bench.TinySizes()
			tc.edit(&z)
			if err := z.Validate(); err == nil {
				t.Error("Validate accepted it")
			}
		})
	}
	for _, z := range []bench.Sizes{bench.TinySizes(), bench.QuickSizes(), bench.FullSizes()} {
		if err := z.Validate(); err != nil {
			t.Errorf("Validate(%+v): %v", z, err)
		}
	}
}
