package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/bench"
	"github.com/granary-build/granary/node"
)

// EnvBenchSizes selects the bench sizes ("tiny" for tests) without a
// visible flag.
const EnvBenchSizes = "GRANARY_BENCH_SIZES"

func cmdBench(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("bench", false)
	if err != nil {
		return err
	}
	quick := f.Bool("quick", false, "a run of under a minute (fewer rounds, TTL 3s, lock delay 1s)")
	jsonPath := f.String("json", "", "write the results as JSON to this file")
	chartPath := f.String("chart", "", "write a PNG chart (hot path and waiter release vs concurrency) to this file")
	dir := f.String("dir", "", "where to make the temporary shared root (default $TMPDIR); put it on the farm's volume to include its cost")
	only := f.String("only", "", "run only these scenarios, comma-separated ("+strings.Join(bench.Scenarios(), ", ")+"); the agent scenario times granary-run too when it is next to this program")
	farm := f.Bool("farm", false, "run the farm simulation instead (H hosts × a job rate per host on a 3-member embedded etcd; --quick: 10 and 100 hosts, shorter)")
	ff := farmFlags(f.FlagSet, bench.DefaultFarm().Linger)
	if err := noArgs(e, f, args); err != nil {
		return err
	}
	if *farm {
		return cmdFarm(ctx, e, ff, *quick, *jsonPath, *dir)
	}
	sizes := bench.FullSizes()
	if *quick {
		sizes = bench.QuickSizes()
	}
	if e.getenv(EnvBenchSizes) == "tiny" {
		sizes = bench.TinySizes()
	}
	cfg := f.cfg
	eps := cfg.Endpoints
	where := "etcd at " + strings.Join(eps, ",")
	if cfg.Embedded() {
		// A private embedded etcd of its own, never the local node's.
		tmp, err := os.MkdirTemp("", "granary-bench")
		if err != nil {
			return err
		}
		defer etcdstore.RemoveTree(tmp) //nolint:errcheck // a temporary directory
		emb, err := node.StartEmbedded(ctx, tmp)
		if err != nil {
			return err
		}
		defer emb.Close()
		eps = []string{emb.Endpoint}
		cfg.Endpoints = eps
		where = "a private embedded etcd (fsync on) in " + tmp
	} else if err := cfg.Validate(); err != nil {
		return &ExitErr{Code: ExitUsage, Err: err}
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("granary bench: cannot find own executable for the memory scenarios: %w", err)
	}
	fmt.Fprintf(e.stderr, "granary bench: %s\n", where)
	rep, err := bench.Run(ctx, bench.Config{
		Sizes: sizes,
		NewClient: func(extra ...grpc.DialOption) (*clientv3.Client, error) {
			cc, err := cfg.ClientConfig(eps)
			if err != nil {
				return nil, err
			}
			cc.DialOptions = append(cc.DialOptions, extra...)
			return clientv3.New(cc)
		},
		Dir:       *dir,
		Child:     func(ctx context.Context, args []string) *exec.Cmd { return benchChild(ctx, exe, cfg, args) },
		Run:       func(ctx context.Context, args, env []string) *exec.Cmd { return benchRun(ctx, exe, cfg, args, env) },
		RunLight:  benchRunLight(exe),
		Only:      splitOnly(*only),
		Progress:  e.stderr,
		OpTimeout: cfg.OpTimeout,
	})
	if err != nil {
		return err
	}
	printBench(e, rep)
	if *jsonPath != "" {
		out := map[string]any{"meta": rep.Meta, "goals": rep.Goals, "series": rep.Series}
		for k, v := range rep.Results {
			out[k] = v
		}
		b, err := json.MarshalIndent(out, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(*jsonPath, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("granary bench: %w", err)
		}
	}
	if *chartPath != "" {
		png, err := bench.Chart(rep)
		if err != nil {
			return fmt.Errorf("granary bench: chart: %w", err)
		}
		if err := os.WriteFile(*chartPath, png, 0o644); err != nil {
			return fmt.Errorf("granary bench: %w", err)
		}
	}
	return nil
}

func printBench(e *env, rep *bench.Report) {
	keys := make([]string, 0, len(rep.Results))
	for k := range rep.Results {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(e.stdout, "%-42s %12.3f\n", k, rep.Results[k])
	}
	fmt.Fprintln(e.stdout, "\ngoals:")
	for _, g := range rep.Goals {
		mark := "MET "
		if !g.Met {
			mark = "MISS"
		}
		fmt.Fprintf(e.stdout, "  %s %-26s %10.3f  want %s\n", mark, g.Key, g.Got, g.Want)
	}
	fmt.Fprintf(e.stdout, "\n%d CPUs (%s), %s, %.0f s; memory: %s\n", rep.Meta.CPUs, rep.Meta.CPUModel, rep.Meta.GoVersion, rep.Meta.Elapsed, rep.Meta.Memory)
}

// benchChild is the command of a memory scenario's child process: this
// program as `granary bench-child` with the same connection settings (a
// password goes through the environment, a password file by name).
func benchChild(ctx context.Context, exe string, cfg node.Config, args []string) *exec.Cmd {
	a := []string{"bench-child", "--endpoints", strings.Join(cfg.Endpoints, ","), "--op-timeout", cfg.OpTimeout.String()}
	for _, kv := range [][2]string{{"--cacert", cfg.CACert}, {"--cert", cfg.Cert}, {"--key", cfg.Key}, {"--user", cfg.User}, {"--password-file", cfg.PasswordFile}} {
		if kv[1] != "" {
			a = append(a, kv[0], kv[1])
		}
	}
	cmd := exec.CommandContext(ctx, exe, append(append(a, "--"), args...)...)
	cmd.Args[0] = "granary" // as startNode does: the name selects the program in tests
	cmd.Env = os.Environ()
	if cfg.Password != "" {
		cmd.Env = append(cmd.Env, node.EnvPassword+"="+cfg.Password)
	}
	return cmd
}

// benchRun is `granary ARGS` (this program) with the bench's connection
// flags, for the timed `granary run` jobs of the agent scenario.
func benchRun(ctx context.Context, exe string, cfg node.Config, args, env []string) *exec.Cmd {
	c := benchChild(ctx, exe, cfg, nil)
	a := append([]string{args[0]}, c.Args[2:len(c.Args)-1]...) // the flags, without "bench-child" and "--"
	cmd := exec.CommandContext(ctx, exe, append(a, args[1:]...)...)
	cmd.Args[0] = "granary"
	cmd.Env = append(c.Env, env...)
	return cmd
}

// benchRunLight returns the commands `granary-run ARGS` of the agent
// scenario, or nil when there is no granary-run next to this program.
func benchRunLight(exe string) func(ctx context.Context, args, env []string) *exec.Cmd {
	light := filepath.Join(filepath.Dir(exe), "granary-run")
	if st, err := os.Stat(light); err != nil || st.Mode()&0o111 == 0 {
		return nil
	}
	return func(ctx context.Context, args, env []string) *exec.Cmd {
		cmd := exec.CommandContext(ctx, light, args...)
		cmd.Env = append(os.Environ(), env...)
		return cmd
	}
}

func splitOnly(s string) []string {
	var out []string
	for _, o := range strings.Split(s, ",") {
		if o = strings.TrimSpace(o); o != "" {
			out = append(out, o)
		}
	}
	return out
}

// cmdBenchChild is the hidden child of `granary bench`.
func cmdBenchChild(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("bench-child", false)
	if err != nil {
		return err
	}
	_, role, err := e.parse(f, args)
	if err != nil {
		return err
	}
	cli, err := node.Dial(ctx, &f.cfg)
	if err != nil {
		return err
	}
	defer cli.Close()
	return bench.ChildMain(ctx, role, cli, e.stdout)
}
