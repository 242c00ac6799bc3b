package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/granary-build/granary/internal/bench"
	"github.com/granary-build/granary/node"
)

// farmFlagValues are the flags of `granary-bench farm`; zero values keep
// bench.DefaultFarm's.
type farmFlagValues struct {
	quick                bool
	jsonPath, dir        string
	hosts, modes         string
	hostRate, zipfS      float64
	maxRate              float64
	packages             int
	warm, duration, hold time.Duration
	linger               time.Duration
}

// farmFlags registers the farm's flags on fs; the agents' linger defaults
// to linger (the published run's, bench.DefaultFarm's).
func farmFlags(fs *flag.FlagSet, linger time.Duration) *farmFlagValues {
	v := &farmFlagValues{linger: linger}
	d := bench.DefaultFarm()
	fs.BoolVar(&v.quick, "quick", false, "10 and 100 hosts, 5 s each")
	fs.StringVar(&v.jsonPath, "json", "", "write the configuration and results as JSON to this file")
	fs.StringVar(&v.dir, "dir", "", "where to make the temporary shared root (default $TMPDIR)")
	fs.StringVar(&v.hosts, "hosts", "", "host counts, comma-separated (default 10,100,1000)")
	fs.StringVar(&v.modes, "modes", "", "modes, comma-separated (default "+strings.Join(d.Modes, ",")+")")
	fs.Float64Var(&v.hostRate, "host-rate", 0, fmt.Sprintf("job starts per second per host (default %g)", d.HostRate))
	fs.Float64Var(&v.maxRate, "max-rate", 0, fmt.Sprintf("cap on the total job rate of the direct and socket agent modes (default %g)", d.MaxRate[bench.FarmDirect]))
	fs.IntVar(&v.packages, "packages", 0, fmt.Sprintf("published packages (default %d)", d.Packages))
	fs.Float64Var(&v.zipfS, "zipf-s", 0, fmt.Sprintf("Zipf exponent of the packages' popularity, > 1 (default %g)", d.ZipfS))
	fs.Var(node.NonNegative(&v.linger), "linger", fmt.Sprintf("the agents' linger: how long a host keeps a package's etcd reference after its last local job (default %v; the node's is %v)", linger, node.DefaultLinger))
	fs.DurationVar(&v.warm, "warm", 0, "warm-up of the agent modes (default linger + hold + 5s: steady state)")
	fs.DurationVar(&v.duration, "duration", 0, fmt.Sprintf("measured time per host count and mode (default %v)", d.Duration))
	fs.DurationVar(&v.hold, "hold", 0, fmt.Sprintf("how long each job holds its package (default %v)", d.Hold))
	return v
}

// cmdFarm is `granary-bench farm [flags]`: the farm simulation on a
// private 3-member embedded etcd cluster.
func cmdFarm(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("granary-bench farm", false)
	if err != nil {
		return err
	}
	v := farmFlags(f.FlagSet, bench.DefaultFarm().Linger)
	if err := e.parseNoArgs(f, args); err != nil {
		return err
	}
	cfg, err := v.config(f, e.getenv(EnvSizes) == "tiny")
	if err != nil {
		return err
	}
	cfg.Progress = e.stderr
	start := time.Now()
	res, err := bench.Farm(ctx, cfg)
	printFarm(e, res)
	if err != nil || v.jsonPath == "" {
		return err
	}
	meta := map[string]any{
		"date": start.UTC(), "elapsed_s": time.Since(start).Seconds(),
		"go_version": runtime.Version(), "cpus": runtime.NumCPU(), "args": os.Args[1:],
	}
	b, err := json.MarshalIndent(map[string]any{"meta": meta, "farm": cfg, "results": res}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(v.jsonPath, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("granary-bench farm: %w", err)
	}
	return nil
}

// config is the farm's configuration: bench.DefaultFarm's with the flags
// applied; tiny is the token run of the tests.
func (v *farmFlagValues) config(f *flags, tiny bool) (bench.FarmConfig, error) {
	cfg := bench.DefaultFarm()
	cfg.Linger = v.linger
	if v.quick {
		cfg.Hosts, cfg.Duration = []int{10, 100}, 5*time.Second
	}
	if tiny {
		cfg.Hosts, cfg.Packages, cfg.Duration, cfg.DirectWarm, cfg.Hold = []int{3}, 5, 300*time.Millisecond, 50*time.Millisecond, time.Millisecond
	}
	if v.hosts != "" {
		cfg.Hosts = nil
		for _, h := range strings.Split(v.hosts, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(h))
			if err != nil || n <= 0 {
				return cfg, f.usageErr("--hosts: %q is not a positive host count", h)
			}
			cfg.Hosts = append(cfg.Hosts, n)
		}
	}
	if v.modes != "" {
		cfg.Modes = strings.Split(v.modes, ",")
	}
	if v.hostRate != 0 {
		cfg.HostRate = v.hostRate
	}
	if v.maxRate != 0 {
		cfg.MaxRate = map[string]float64{bench.FarmDirect: v.maxRate, bench.FarmAgent: v.maxRate}
	}
	if v.packages != 0 {
		cfg.Packages = v.packages
	}
	if v.zipfS != 0 {
		cfg.ZipfS = v.zipfS
	}
	if v.hold != 0 {
		cfg.Hold = v.hold
	}
	if v.duration != 0 {
		cfg.Duration = v.duration
	}
	cfg.Warm = v.warm
	cfg.Dir = v.dir
	return cfg, nil
}

// printFarm prints the results as a table.
func printFarm(e *env, res []bench.FarmResult) {
	if len(res) == 0 {
		return
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "hosts\tmode\tjobs/s/host\tlinger s\twarm s\tjobs\tjobs/s\tetcd writes/s\twrites/job\tpredicted\tstart p50 ms\tp99 ms\tnote\t")
	for _, r := range res {
		var note []string
		if r.Capped {
			note = append(note, "rate capped")
		}
		if !r.Steady {
			note = append(note, "NOT steady (warm < linger)")
		}
		fmt.Fprintf(tw, "%d\t%s\t%.3g\t%g\t%g\t%d\t%.0f\t%.0f\t%.4f\t%.4f\t%.2f\t%.2f\t%s\t\n",
			r.Hosts, r.Mode, r.HostRate, r.LingerS, r.WarmS, r.Jobs, r.JobsPerS, r.WritesPerS,
			r.WritesPerJob, r.Predicted, r.StartP50MS, r.StartP99MS, strings.Join(note, ", "))
	}
	tw.Flush()
	fmt.Fprintln(e.stdout, "writes/job is valid as steady state only where warm ≥ linger + hold; predicted: Σ pₖ·2·exp(−pₖ·r·(L+hold)) over the Zipf popularity pₖ")
}
