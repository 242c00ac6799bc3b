package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/granary-build/granary/internal/bench"
)

// cmdFarm is `granary bench --farm`: the farm simulation on a private
// 3-member embedded etcd cluster.
func cmdFarm(ctx context.Context, e *env, quick bool, jsonPath, dir string) error {
	cfg := bench.DefaultFarm()
	if quick {
		cfg.Hosts, cfg.Duration, cfg.Warm = []int{10, 100}, 3*time.Second, time.Second
	}
	if e.getenv(EnvBenchSizes) == "tiny" {
		cfg.Hosts, cfg.Packages, cfg.Rate, cfg.Duration, cfg.Warm = []int{3}, 5, 200, 300*time.Millisecond, 100*time.Millisecond
	}
	cfg.Dir, cfg.Progress = dir, e.stderr
	res, err := bench.Farm(ctx, cfg)
	if err != nil {
		return err
	}
	keys := make([]string, 0, len(res))
	for k := range res {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(e.stdout, "%-45s %12.4f\n", k, res[k])
	}
	if jsonPath == "" {
		return nil
	}
	b, err := json.MarshalIndent(map[string]any{"farm": cfg, "results": res}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(jsonPath, append(b, '\n'), 0o644)
}
