package main

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
	"github.com/granary-build/granary/internal/jobrun"
	"github.com/granary-build/granary/node"
)

// cmdBench is `granary-bench [flags]`: every scenario (or --only some) on
// the etcd of the connection flags, else on a private embedded etcd.
func cmdBench(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("granary-bench", true)
	if err != nil {
		return err
	}
	quick := f.Bool("quick", false, "a run of under a minute (fewer rounds, TTL 3s, lock delay 1s)")
	jsonPath := f.String("json", "", "write the results as JSON to this file")
	chartPath := f.String("chart", "", "write a PNG chart (hot path and waiter release vs concurrency) to this file")
	dir := f.String("dir", "", "where to make the temporary shared root (default $TMPDIR); put it on the farm's volume to include its cost")
	only := f.String("only", "", "run only these scenarios, comma-separated ("+strings.Join(bench.Scenarios(), ", ")+")")
	granary := f.String("granary", "", "the granary binary whose warm 'granary run' jobs the agent scenario times (default: next to this program, else in $PATH)")
	granaryRun := f.String("granary-run", "", "the granary-run binary the agent scenario times (default: next to this program, else in $PATH)")
	if err := e.parseNoArgs(f, args); err != nil {
		return err
	}
	sizes := bench.FullSizes()
	if *quick {
		sizes = bench.QuickSizes()
	}
	if e.getenv(EnvSizes) == "tiny" {
		sizes = bench.TinySizes()
	}
	cfg, closeEtcd, err := benchEtcd(ctx, e, f.cfg)
	if err != nil {
		return err
	}
	defer closeEtcd()
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("granary-bench: cannot find own executable for the memory scenarios: %w", err)
	}
	run, light := findProgram(exe, "granary", *granary), findProgram(exe, "granary-run", *granaryRun)
	for _, p := range []struct{ name, path string }{{"granary", run}, {"granary-run", light}} {
		if p.path == "" {
			fmt.Fprintf(e.stderr, "granary-bench: no %s next to this program or in $PATH: the agent scenario skips its %s jobs\n", p.name, p.name)
		} else {
			fmt.Fprintf(e.stderr, "granary-bench: the agent scenario times %s\n", p.path)
		}
	}
	rep, err := bench.Run(ctx, bench.Config{
		Sizes: sizes,
		NewClient: func(extra ...grpc.DialOption) (*clientv3.Client, error) {
			cc, err := cfg.ClientConfig(cfg.Endpoints)
			if err != nil {
				return nil, err
			}
			cc.DialOptions = append(cc.DialOptions, extra...)
			return clientv3.New(cc)
		},
		Dir:       *dir,
		Child:     func(ctx context.Context, args []string) *exec.Cmd { return benchChild(ctx, exe, cfg, args) },
		Run:       granaryCmd(run, cfg),
		RunLight:  lightCmd(light),
		Only:      splitOnly(*only),
		Progress:  e.stderr,
		OpTimeout: cfg.OpTimeout,
	})
	if err != nil {
		return err
	}
	printBench(e, rep)
	return writeBench(rep, *jsonPath, *chartPath)
}

// benchEtcd returns cfg with the endpoints of the etcd to measure: cfg's
// own (validated), or with none a private embedded etcd, never the local
// node's, which stop stops and removes.
func benchEtcd(ctx context.Context, e *env, cfg node.Config) (_ node.Config, stop func(), err error) {
	if !cfg.Embedded() {
		if err := cfg.Validate(); err != nil {
			return cfg, nil, &jobrun.ExitErr{Code: jobrun.ExitUsage, Err: err}
		}
		fmt.Fprintf(e.stderr, "granary-bench: etcd at %s\n", strings.Join(cfg.Endpoints, ","))
		return cfg, func() {}, nil
	}
	tmp, err := os.MkdirTemp("", "granary-bench")
	if err != nil {
		return cfg, nil, err
	}
	emb, err := node.StartEmbedded(ctx, tmp)
	if err != nil {
		etcdstore.RemoveTree(tmp) //nolint:errcheck // a temporary directory
		return cfg, nil, err
	}
	cfg.Endpoints = []string{emb.Endpoint}
	fmt.Fprintf(e.stderr, "granary-bench: a private embedded etcd (fsync on) in %s\n", tmp)
	return cfg, func() {
		emb.Close()
		etcdstore.RemoveTree(tmp) //nolint:errcheck // a temporary directory
	}, nil
}

// writeBench writes the report as JSON to jsonPath and its chart as PNG
// to chartPath, each if set.
func writeBench(rep *bench.Report, jsonPath, chartPath string) error {
	if jsonPath != "" {
		out := map[string]any{"meta": rep.Meta, "goals": rep.Goals, "series": rep.Series}
		for k, v := range rep.Results {
			out[k] = v
		}
		b, err := json.MarshalIndent(out, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(jsonPath, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("granary-bench: %w", err)
		}
	}
	if chartPath != "" {
		png, err := bench.Chart(rep)
		if err != nil {
			return fmt.Errorf("granary-bench: chart: %w", err)
		}
		if err := os.WriteFile(chartPath, png, 0o644); err != nil {
			return fmt.Errorf("granary-bench: %w", err)
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

// connFlags are the connection flags of cfg that the processes the bench
// starts need: endpoints, TLS, credentials (a password goes through the
// environment, a password file by name) and the op timeout.
func connFlags(cfg node.Config) []string {
	a := []string{"--endpoints", strings.Join(cfg.Endpoints, ","), "--op-timeout", cfg.OpTimeout.String()}
	for _, kv := range [][2]string{{"--cacert", cfg.CACert}, {"--cert", cfg.Cert}, {"--key", cfg.Key}, {"--user", cfg.User}, {"--password-file", cfg.PasswordFile}} {
		if kv[1] != "" {
			a = append(a, kv[0], kv[1])
		}
	}
	return a
}

// connEnv is this process's environment with cfg's password, if any.
func connEnv(cfg node.Config) []string {
	env := os.Environ()
	if cfg.Password != "" {
		env = append(env, node.EnvPassword+"="+cfg.Password)
	}
	return env
}

// benchChild is the command of a memory scenario's child process: this
// program as `granary-bench child` with the same connection settings.
func benchChild(ctx context.Context, exe string, cfg node.Config, args []string) *exec.Cmd {
	a := append(append(append([]string{"child"}, connFlags(cfg)...), "--"), args...)
	cmd := exec.CommandContext(ctx, exe, a...)
	cmd.Args[0] = "granary-bench" // the name selects the program in tests
	cmd.Env = connEnv(cfg)
	return cmd
}

// findProgram returns the program name to time: path if set, else the
// one next to exe, else the one in $PATH; "" if there is none.
func findProgram(exe, name, path string) string {
	if path != "" {
		return path
	}
	next := filepath.Join(filepath.Dir(exe), name)
	if st, err := os.Stat(next); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
		return next
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return ""
	}
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// granaryCmd returns the commands `granary ARGS` of the agent scenario with
// the bench's connection flags after the subcommand, or nil without a
// granary program.
func granaryCmd(path string, cfg node.Config) func(ctx context.Context, args, env []string) *exec.Cmd {
	if path == "" {
		return nil
	}
	return func(ctx context.Context, args, env []string) *exec.Cmd {
		a := args
		if args[0] != "help" { // help takes a command name, not flags: the start floor
			a = append(append([]string{args[0]}, connFlags(cfg)...), args[1:]...)
		}
		cmd := exec.CommandContext(ctx, path, a...)
		cmd.Env = append(connEnv(cfg), env...)
		return cmd
	}
}

// lightCmd returns the commands `granary-run ARGS` of the agent scenario,
// or nil without a granary-run program.
func lightCmd(path string) func(ctx context.Context, args, env []string) *exec.Cmd {
	if path == "" {
		return nil
	}
	return func(ctx context.Context, args, env []string) *exec.Cmd {
		cmd := exec.CommandContext(ctx, path, args...)
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

// cmdChild is `granary-bench child [flags] -- ROLE ROOT PREFIX [ARGS...]`,
// the child process of the memory scenarios and of the agent scenario's
// servers (the echo floor, a node).
func cmdChild(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("granary-bench child", true)
	if err != nil {
		return err
	}
	if err := f.Parse(args); err != nil {
		return f.usageErr("%v", err)
	}
	var cli *clientv3.Client
	if bench.ChildNeedsEtcd(f.Args()) { // the echo floor does not: nothing but the echo in its process
		if cli, err = node.Dial(ctx, &f.cfg); err != nil {
			return err
		}
		defer cli.Close()
	}
	return bench.ChildMain(ctx, f.Args(), cli, e.stdout)
}
