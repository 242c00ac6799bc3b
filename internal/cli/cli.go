package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
	"github.com/granary-build/granary/node"
)

// usageErr is a command-line error of command cmd.
func usageErr(cmd string, format string, args ...any) error {
	c := commands[cmd]
	msg := fmt.Sprintf(format, args...)
	if c != nil {
		msg += fmt.Sprintf("\nusage: granary %s %s\n(run 'granary %s -h' for its flags)", cmd, c.usage, cmd)
	}
	return &ExitErr{Code: ExitUsage, Err: fmt.Errorf("granary %s: %s", cmd, msg)}
}

// env is one invocation's I/O.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
	// describe, if set, receives the command's flag set instead of its
	// arguments being parsed; the command then ends with errDescribed
	// (how 'granary completion' learns each command's flags).
	describe func(*flags)
}

type command struct {
	usage string
	short string
	run   func(ctx context.Context, e *env, args []string) error
}

// longHelp is more about a command, for 'granary COMMAND --help' (lines
// ending in a newline).
var longHelp = map[string]string{
	"build": `CMD runs only if the package is not available (nor in the remote cache),
with $` + EnvOut + ` (write the package's files there) and $` + EnvLogs + ` (a
directory for extra logs) in its environment; its output is shown and kept
in the package's log directory ('granary logs ID'). While another host
builds the package, build waits and says who builds it. Exits with CMD's
code.

--needs DEP (repeatable) builds the package on DEP: build takes a reference
on each need before CMD runs (waiting for one being built; exit 3 naming a
need that does not exist or was invalidated) and holds it while CMD runs;
CMD finds them in $` + EnvNeeds + `, space-separated ID:PATH pairs in the
order given (IDs never contain ':'; PATH is the need's contents directory, a
stable path the package may embed). The package records its needs: a
reference on it protects them, and they cannot be removed while it exists.
`,
	"pin": `A pinned package, and everything it needs, is never removed by rm or gc
until it is unpinned or --for passes. Pins belong to no process: they
survive restarts and crashes. Through the local node, pin, unpin,
invalidate and rm need root, the node's user or its --admin-group (exit 4
otherwise).
`,
	"invalidate": `Marks the package bad in the whole cluster at once, with every package that
needs it: no new reference is granted (run exits 3 and says who invalidated
it and why), jobs that hold it keep running, and it is removed as soon as
its last holder leaves. The next build of it waits for that removal and
builds afresh. Prints what was invalidated, what was removed now and what
is still held.
`,
	"why": `Lists everything that keeps the package from removal right now: references
per host (a node's reference with how many of its jobs hold it), a pin,
the packages that need it and what keeps them (a tree), a build in
progress, an invalidation, and the gc grace period (which only gc waits
for); or says that nothing does.
`,
	"run": `CMD runs with $` + EnvPkg + ` (the package's files) while a reference keeps
the package from removal; signals are forwarded and run exits with CMD's
code.
`,
}

var commands map[string]*command

func init() {
	commands = map[string]*command{
		"serve":      {"[flags]", "run a node in the foreground", cmdServe},
		"version":    {"", "print the module version and VCS revision of this binary", cmdVersion},
		"completion": {"bash|zsh|fish", "print a shell completion script (e.g. source <(granary completion bash))", cmdCompletion},
		"build":      {"[flags] ID -- CMD [ARGS...]", "build a package once, running CMD only if it is not available", cmdBuild},
		"run":        {"[flags] ID -- CMD [ARGS...]", "run CMD holding a reference to a package ($GRANARY_PKG)", cmdRun},
		"ls":         {"[flags]", "list packages", cmdLs},
		"inspect":    {"[flags] ID", "describe a package: state, builder, references, size, digest, logs", cmdInspect},
		"logs":       {"[--follow] [--attempt N] [--list] ID", "print a package's build log from any host, or follow the build in progress", cmdLogs},
		"events":     {"[--json] [--since REV]", "stream what the cluster does: builds, waits, publishes, failures, removals, references, GC, nodes", cmdEvents},
		"rm":         {"[flags] ID", "remove a package unless it is referenced, pinned, needed by another or being built", cmdRm},
		"pin":        {"[--for DURATION] [--note TEXT] ID", "keep a package (and what it needs) from rm and gc until unpinned or --for passes", cmdPin},
		"unpin":      {"[flags] ID", "remove a package's pin", cmdUnpin},
		"invalidate": {"--reason TEXT ID", "mark a package (and what needs it) bad everywhere: no new run; removed when its last holder leaves", cmdInvalidate},
		"why":        {"[--json] ID", "explain what keeps a package from removal: holders, pin, dependents, a build, gc grace", cmdWhy},
		"gc":         {"[flags]", "remove unused packages (--older-than, --target-size, --dry-run)", cmdGC},
		"status":     {"[flags]", "show nodes, builds in progress and totals", cmdStatus},
		"verify":     {"[flags] ID", "check a package's tree against the digest recorded at publish", cmdVerify},
		"node":       {"status|stop [flags]", "show or stop the local node", cmdNode},
		"init-root":  {"[flags]", "make --root the shared root of the prefix, replacing the one etcd knows (a new volume)", cmdInitRoot},
		"cache":      {"push|pull|verify [flags] ID | keygen NAME SEC PUB", "upload a package to the remote cache, fetch one, check its signature, make a signing key", cmdCache},
		"demo":       {"[flags]", "simulate 3 hosts sharing a store, and check what happened", cmdDemo},
	}
}

const topUsage = `granary: a package store shared by the hosts of a build farm

usage: granary COMMAND [flags] [ARGS]

commands:
%s
With no --endpoints (or $GRANARY_ENDPOINTS), commands use the local node,
an embedded etcd started on first use in $XDG_STATE_HOME/granary (else
~/.local/state/granary); packages live under --root, default
$XDG_DATA_HOME/granary (else ~/.local/share/granary).
With --cache URL (or $GRANARY_CACHE), builds check that remote cache before
building and fill it after publishing.

Exit codes: 0 ok, 1 error, 2 usage, 3 package does not exist (or is
invalidated: the message says who invalidated it and why), 4 not allowed
(rm, pin, unpin and invalidate through the local node need root, the node's
user or its --admin-group);
'granary build' and 'granary run' exit with their command's code
(127: it cannot start, 128+N: signal N killed it).
`

// commandOrder is the order of the commands in the help and in shell
// completion.
var commandOrder = []string{"build", "run", "ls", "inspect", "why", "logs", "events", "rm", "gc", "pin", "unpin", "invalidate", "status", "verify", "cache", "node", "init-root", "serve", "demo", "version", "completion"}

func usage() string {
	var b strings.Builder
	for _, name := range commandOrder {
		fmt.Fprintf(&b, "  %-10s %s\n", name, commands[name].short)
	}
	return fmt.Sprintf(topUsage, b.String())
}

// Run runs the granary command line args (without the program name). It
// blocks until the command is done or ctx ends (but `run` waits for its
// child, to which signals are forwarded). Map its error to an exit code
// with ExitCode and to a message with Message.
func Run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	e := &env{stdin: stdin, stdout: stdout, stderr: stderr, getenv: os.Getenv}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage())
		return &ExitErr{Code: ExitUsage}
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		if len(args) > 1 && args[0] == "help" {
			if commands[args[1]] == nil {
				return &ExitErr{Code: ExitUsage, Err: fmt.Errorf("granary: help: unknown command %q (run 'granary help')", args[1])}
			}
			return Run(ctx, []string{args[1], "--help"}, stdin, stdout, stderr)
		}
		fmt.Fprint(stdout, usage())
		return nil
	case "--version", "-version":
		return cmdVersion(ctx, e, args[1:])
	}
	if strings.HasPrefix(args[0], "-") {
		moved, err := e.flagsFirst(args)
		if err != nil {
			return err
		}
		args = moved
	}
	c := commands[args[0]]
	if c == nil && args[0] == "bench" {
		// The lab is a program of its own, so that this one links no test
		// harness and no chart library (cmd/granary-bench).
		return &ExitErr{Code: ExitUsage, Err: errors.New("granary: the benchmarks moved to their own program: go run ./cmd/granary-bench [flags] (in a source checkout; the farm: go run ./cmd/granary-bench farm)")}
	}
	if c == nil {
		return &ExitErr{Code: ExitUsage, Err: fmt.Errorf("granary: unknown command %q (run 'granary help')", args[0])}
	}
	return c.run(ctx, e, args[1:])
}

// flagsFirst handles shared flags given before the command ("granary
// --idle-timeout 5s build …"): it returns args with the command first and
// those flags after it, where the command parses them. Anything else
// before the command is a usage error that says where flags go.
func (e *env) flagsFirst(args []string) ([]string, error) {
	fs := flag.NewFlagSet("granary", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg := node.DefaultConfig()
	cfg.RegisterFlags(fs)
	hint := "flags go after the command: granary COMMAND [flags] [ARGS] (run 'granary help')"
	if err := fs.Parse(args); err != nil {
		// Not a shared flag, or a bad value: the command, if one is
		// named, parses them all and says which (its own flags too).
		if i := slices.IndexFunc(args, func(a string) bool { return commands[a] != nil }); i > 0 {
			return slices.Concat(args[i:i+1], args[:i], args[i+1:]), nil
		}
		return nil, &ExitErr{Code: ExitUsage, Err: fmt.Errorf("granary: %v; %s", err, hint)}
	}
	rest := fs.Args()
	if len(rest) == 0 || commands[rest[0]] == nil {
		return nil, &ExitErr{Code: ExitUsage, Err: fmt.Errorf("granary: no command after the flags; %s", hint)}
	}
	given := args[:len(args)-len(rest)]
	return slices.Concat(rest[:1], given, rest[1:]), nil
}

// flags is a command's flag set with the connection flags bound to cfg.
type flags struct {
	*flag.FlagSet
	name   string
	cfg    node.Config
	json   bool
	shared map[string]bool // the flags node.Config registered, for help
}

// sharedGroups are the headings under which a command's help lists the
// shared flags (node.Config.RegisterFlags), after the command's own.
var sharedGroups = []struct {
	title string
	names []string
}{
	{"store and etcd flags (shared by the commands)", []string{"root", "state-dir", "prefix", "endpoints", "host", "ttl", "op-timeout", "idle-timeout", "failure-retention", "yield-wait"}},
	{"etcd TLS and authentication flags", []string{"cacert", "cert", "key", "user", "password-file"}},
	{"remote cache flags", []string{"cache", "cache-cacert", "cache-sign-key", "cache-trusted-keys", "cache-fetch-budget"}},
}

// takesShared reports whether command cmd takes the shared flag name: the
// remote cache's flags only where the cache is read or filled, the failure
// records' retention only where builds run, the yield wait only where a
// removal asks other nodes to let go, and none for demo (which makes its
// own cluster).
func takesShared(cmd, name string) bool {
	switch {
	case cmd == "demo":
		return false
	case name == "cache-fetch-budget":
		return cmd == "build" || cmd == "serve"
	case name == "cache-sign-key":
		return cmd == "build" || cmd == "serve" || cmd == "cache"
	case strings.HasPrefix(name, "cache"):
		return cmd == "build" || cmd == "serve" || cmd == "cache"
	case name == "failure-retention":
		return cmd == "build" || cmd == "serve"
	case name == "yield-wait":
		return cmd == "rm" || cmd == "serve"
	}
	return true
}

func (e *env) newFlags(name string, withJSON bool) (*flags, error) {
	f := &flags{FlagSet: flag.NewFlagSet("granary "+name, flag.ContinueOnError), name: name, shared: map[string]bool{}}
	f.SetOutput(io.Discard)
	f.cfg = node.DefaultConfig()
	if err := f.cfg.FromEnv(e.getenv); err != nil {
		return nil, &ExitErr{Code: ExitUsage, Err: fmt.Errorf("granary: %w", err)}
	}
	all := flag.NewFlagSet("", flag.ContinueOnError)
	f.cfg.RegisterFlags(all)
	all.VisitAll(func(fl *flag.Flag) {
		if takesShared(name, fl.Name) {
			f.Var(fl.Value, fl.Name, fl.Usage)
			f.Lookup(fl.Name).DefValue = fl.DefValue
			f.shared[fl.Name] = true
		}
	})
	if withJSON {
		f.BoolVar(&f.json, "json", false, "print data as JSON")
	}
	return f, nil
}

// printHelp prints the command's usage, its own flags, then the shared
// ones it takes, group by group.
func (e *env) printHelp(f *flags) {
	c := commands[f.name]
	fmt.Fprintf(e.stdout, "usage: granary %s %s\n\n%s.\n", f.name, c.usage, c.short)
	if h := longHelp[f.name]; h != "" {
		fmt.Fprintf(e.stdout, "\n%s", h)
	}
	group := func(title string, want func(name string) bool) {
		sub := flag.NewFlagSet("", flag.ContinueOnError)
		n := 0
		f.VisitAll(func(fl *flag.Flag) {
			if want(fl.Name) {
				sub.Var(fl.Value, fl.Name, fl.Usage)
				sub.Lookup(fl.Name).DefValue = fl.DefValue
				n++
			}
		})
		if n == 0 {
			return
		}
		fmt.Fprintf(e.stdout, "\n%s:\n", title)
		sub.SetOutput(e.stdout)
		sub.PrintDefaults()
	}
	group("flags", func(name string) bool { return !f.shared[name] })
	for _, g := range sharedGroups {
		group(g.title, func(name string) bool { return f.shared[name] && slices.Contains(g.names, name) })
	}
}

// parse parses flags that may appear anywhere before a "--"; it returns the
// positional arguments and, after "--", the command.
func (e *env) parse(f *flags, args []string) (pos, cmd []string, err error) {
	if e.describe != nil {
		e.describe(f)
		return nil, nil, errDescribed
	}
	before := args
	for i, a := range args {
		if a == "--" {
			before, cmd = args[:i], args[i+1:]
			break
		}
	}
	for {
		if err := f.Parse(before); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				e.printHelp(f)
				return nil, nil, &ExitErr{Code: ExitOK}
			}
			undefined := strings.HasPrefix(err.Error(), "flag provided but not defined")
			if undefined && len(pos) == 0 && strings.Contains(commands[f.name].usage, "ID") {
				// Where the ID goes: an ID never starts with '-'.
				return nil, nil, usageErr(f.name, "%v (if it was meant as the package ID: IDs cannot start with '-')", err)
			}
			if undefined && len(pos) > 0 && cmd == nil && strings.Contains(commands[f.name].usage, "-- CMD") {
				// "granary build x sh -c …": the -c was meant for the
				// command, which goes after "--".
				what := "command"
				if f.name == "build" {
					what = "builder command"
				}
				return nil, nil, usageErr(f.name, "%v; put the %s after --", err, what)
			}
			return nil, nil, usageErr(f.name, "%v", err)
		}
		rest := f.Args()
		if len(rest) == 0 {
			return pos, cmd, nil
		}
		pos = append(pos, rest[0])
		before = rest[1:]
	}
}

// parseID parses a command that takes exactly one package ID.
func (e *env) parseID(f *flags, args []string) (string, error) {
	pos, cmd, err := e.parse(f, args)
	if err != nil {
		return "", err
	}
	if len(pos) != 1 || cmd != nil {
		return "", usageErr(f.name, "want exactly one package ID, got %d argument(s)", len(pos)+len(cmd))
	}
	return pos[0], checkID(pos[0])
}

// parseIDCmd parses ID -- CMD [ARGS...].
func (e *env) parseIDCmd(f *flags, args []string) (string, []string, error) {
	pos, cmd, err := e.parse(f, args)
	if err != nil {
		return "", nil, err
	}
	if len(pos) == 0 {
		return "", nil, usageErr(f.name, "missing package ID")
	}
	if cmd == nil && len(pos) > 1 {
		cmd = pos[1:] // "granary build ID CMD" without "--"
	} else if len(pos) > 1 {
		return "", nil, usageErr(f.name, "unexpected %q before \"--\"", pos[1])
	}
	if len(cmd) == 0 {
		return "", nil, usageErr(f.name, "missing command after \"--\"")
	}
	return pos[0], cmd, checkID(pos[0])
}

func checkID(id string) error {
	if err := core.ValidateID(id); err != nil {
		return &ExitErr{Code: ExitUsage, Err: err}
	}
	return nil
}

// conn is a command's connection: its client, its store (its own lease)
// and the remote cache the store uses, if any.
type conn struct {
	cli   *clientv3.Client
	store *etcdstore.Store
	cache *cache.Remote // nil without --cache
	cfg   node.Config
}

// connect validates cfg, makes sure a local node runs when there are no
// endpoints (starting one if needed), and opens a store on cfg.Root.
func (e *env) connect(ctx context.Context, cfg node.Config, opts ...etcdstore.Option) (*conn, error) {
	if err := cfg.Validate(); err != nil {
		return nil, &ExitErr{Code: ExitUsage, Err: err}
	}
	if cfg.Embedded() {
		if err := e.ensureLocalNode(ctx, cfg); err != nil {
			return nil, err
		}
	}
	cli, err := node.Dial(ctx, &cfg)
	if err != nil {
		if errors.Is(err, node.ErrUnreachable) && !cfg.Embedded() {
			err = fmt.Errorf("%w\n(check --endpoints / $%s, TLS and credentials)", err, node.EnvEndpoints)
		}
		return nil, err
	}
	rc, err := cfg.OpenCache(cache.WithProgress(fetchProgress(e.stderr, isTerminal(e.stderr))))
	if err != nil {
		cli.Close()
		return nil, &ExitErr{Code: ExitUsage, Err: err}
	}
	if rc != nil {
		opts = append([]etcdstore.Option{etcdstore.WithCache(rc)}, opts...)
	}
	s, err := etcdstore.New(ctx, cli, cfg.Root, cfg.StoreOptions(nil, opts...)...)
	if err == nil && s.CreatedRoot() {
		fmt.Fprintf(e.stderr, "granary: created the shared root %s (it did not exist)\n", s.Root())
	}
	if err == nil {
		for _, w := range s.Mount().Warnings {
			fmt.Fprintf(e.stderr, "granary: warning: the shared root %s is on %s (%s): %s\n", s.Root(), s.Mount().MountPoint, s.Mount().FSType, w)
		}
	}
	if err != nil {
		if rc != nil {
			rc.Close()
		}
		cli.Close()
		return nil, err
	}
	return &conn{cli: cli, store: s, cache: rc, cfg: cfg}, nil
}

// Close releases the store's lease (dropping its references at once),
// after its uploads to the remote cache finished, then the cache and the
// client.
func (c *conn) Close() {
	c.store.Close()
	if c.cache != nil {
		c.cache.Close()
	}
	c.cli.Close()
}
