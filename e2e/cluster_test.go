//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
)

// Timing of the e2e cluster. Ceilings are generous multiples of TTL + lock
// delay: they bound a hang, they do not measure speed.
const (
	ttl       = 5 * time.Second
	lockDelay = etcdstore.DefaultLockDelay
	takeover  = 4 * (ttl + lockDelay)
)

var (
	repoRoot string
	compose  []string // "docker compose" or "docker-compose"
	// image is the tag built and run: $GRANARY_E2E_IMAGE, default
	// DefaultImage. Sessions sharing a Docker daemon give theirs a tag and
	// a project prefix ($GRANARY_E2E_PROJECT, default "granarye2e") of
	// their own.
	image         = envOr("GRANARY_E2E_IMAGE", DefaultImage)
	projectPrefix = envOr("GRANARY_E2E_PROJECT", "granarye2e")
)

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	wd, _ := os.Getwd()
	repoRoot = filepath.Dir(wd)
	if out, err := exec.Command("docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: docker is not usable (%v): %s\n", err, out)
		return 1
	}
	if exec.Command("docker", "compose", "version").Run() == nil {
		compose = []string{"docker", "compose"}
	} else if _, err := exec.LookPath("docker-compose"); err == nil {
		compose = []string{"docker-compose"}
	} else {
		fmt.Fprintln(os.Stderr, "e2e: neither `docker compose` nor docker-compose is installed")
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()
	if err := BuildImage(ctx, repoRoot, image, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "e2e: image %s built in %v; compose: %s\n", image, time.Since(start).Round(time.Second), strings.Join(compose, " "))
	return m.Run()
}

// cluster is one docker-compose project: 3 etcd members, 3 workers.
type cluster struct {
	t       *testing.T
	project string
	files   []string
	env     []string

	mu  sync.Mutex
	ids map[string]string // service -> container ID
}

type clusterOpts struct {
	files []string // extra compose files (overrides)
	env   []string // extra environment for compose
	only  []string // services to start first (default: all)
	netfs bool     // the shared root is already on network-file-system mounts
}

var nonAlnum = regexp.MustCompile(`[^a-z0-9]+`)

// newCluster starts a fresh project named after the test and tears it down
// (volumes too) at the end, printing the containers' logs if the test failed.
//
// With GRANARY_E2E_NETFS=1 every cluster runs on network-file-system
// mounts (see newNetFSCluster): the fault scenarios then run with each
// worker on its own NFS-like client of the shared root.
func newCluster(t *testing.T, o clusterOpts) *cluster {
	t.Helper()
	if os.Getenv("GRANARY_E2E_NETFS") == "1" && !o.netfs {
		c, _ := newNetFSCluster(t, o)
		return c
	}
	c := &cluster{
		t:       t,
		project: projectPrefix + nonAlnum.ReplaceAllString(strings.ToLower(strings.TrimPrefix(t.Name(), "Test")), ""),
		files:   append([]string{filepath.Join(repoRoot, "docker-compose.yml")}, o.files...),
		env:     append([]string{"GRANARY_TTL=" + fmt.Sprint(int(ttl.Seconds())), "GRANARY_IMAGE=" + image}, o.env...),
		ids:     map[string]string{},
	}
	c.compose(context.Background(), "down", "-v", "--remove-orphans") // leftovers of an interrupted run
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := c.compose(context.Background(), "logs", "--no-color", "--tail", "150")
			t.Logf("container logs:\n%s", out)
		}
		for _, id := range c.ids {
			c.docker(context.Background(), "unpause", id) // a paused container blocks down
		}
		if out, err := c.compose(context.Background(), "down", "-v", "--remove-orphans", "-t", "2"); err != nil {
			t.Logf("compose down: %v\n%s", err, out)
		}
	})
	c.up(o.only...)
	return c
}

// up starts services (all by default) and waits until Docker reports them
// healthy: etcd's /health, the workers' /readyz.
func (c *cluster) up(services ...string) {
	c.t.Helper()
	t0 := time.Now()
	if out, err := c.compose(context.Background(), append([]string{"up", "-d"}, services...)...); err != nil {
		c.t.Fatalf("compose up %v: %v\n%s", services, err, out)
	}
	if len(services) == 0 {
		services = []string{"etcd1", "etcd2", "etcd3", "worker1", "worker2", "worker3"}
	}
	for _, s := range services {
		c.waitHealthy(s)
	}
	c.t.Logf("up %v in %v", services, time.Since(t0).Round(100*time.Millisecond))
}

func (c *cluster) waitHealthy(service string) {
	c.t.Helper()
	c.eventually(2*time.Minute, service+" healthy", func() (bool, string) {
		out, _ := c.docker(context.Background(), "inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", c.id(service))
		return strings.TrimSpace(out) == "running healthy", out
	})
}

func (c *cluster) compose(ctx context.Context, args ...string) (string, error) {
	full := append(append([]string{}, compose[1:]...), "-p", c.project)
	for _, f := range c.files {
		full = append(full, "-f", f)
	}
	cmd := exec.CommandContext(ctx, compose[0], append(full, args...)...)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), c.env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (c *cluster) docker(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "docker", args...).CombinedOutput()
	return string(out), err
}

// id returns the container of a service.
func (c *cluster) id(service string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if id, ok := c.ids[service]; ok {
		return id
	}
	out, err := c.compose(context.Background(), "ps", "-q", service)
	id := strings.TrimSpace(out)
	if err != nil || id == "" {
		c.t.Fatalf("no container for %s: %v %s", service, err, out)
	}
	c.ids[service] = id
	return id
}

// forget drops the cached container IDs (after containers were recreated).
func (c *cluster) forget() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.ids)
}

// result is what a command in a container did.
type result struct {
	out  string // stdout and stderr
	code int    // exit code; -1 if it could not be run
}

func (r result) String() string { return fmt.Sprintf("exit %d: %s", r.code, strings.TrimSpace(r.out)) }

// exec runs args in service's container and waits for it.
func (c *cluster) exec(ctx context.Context, service string, args ...string) result {
	cmd := exec.CommandContext(ctx, "docker", append([]string{"exec", c.id(service)}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return result{out.String(), 0}
	case errors.As(err, &ee):
		return result{out.String(), ee.ExitCode()}
	}
	return result{out.String() + err.Error(), -1}
}

// sh runs a busybox shell script in service's container, with a ceiling.
func (c *cluster) sh(service, script string) result {
	ctx, cancel := context.WithTimeout(context.Background(), takeover)
	defer cancel()
	return c.exec(ctx, service, "sh", "-c", script)
}

// granary runs the CLI in service's container, with a ceiling.
func (c *cluster) granary(service string, args ...string) result {
	ctx, cancel := context.WithTimeout(context.Background(), takeover)
	defer cancel()
	return c.exec(ctx, service, append([]string{"granary"}, args...)...)
}

// must runs the CLI and fails the test unless it exits 0.
func (c *cluster) must(service string, args ...string) string {
	c.t.Helper()
	r := c.granary(service, args...)
	if r.code != 0 {
		c.t.Fatalf("%s: granary %s: %s", service, strings.Join(args, " "), r)
	}
	return r.out
}

// background runs the CLI in service's container without waiting; the
// result arrives on the channel. The docker client keeps the exec attached,
// so pausing or cutting the container off the network does not end it.
func (c *cluster) background(service string, args ...string) <-chan result {
	return c.backgroundExec(service, append([]string{"granary"}, args...)...)
}

// backgroundExec is background for any command.
func (c *cluster) backgroundExec(service string, args ...string) <-chan result {
	ch := make(chan result, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	go func() {
		defer cancel()
		ch <- c.exec(ctx, service, args...)
	}()
	return ch
}

// wait receives a background result within the ceiling.
func (c *cluster) wait(ch <-chan result, ceiling time.Duration, what string) result {
	c.t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(ceiling):
		c.t.Fatalf("%s: no result within %v", what, ceiling)
	}
	return result{}
}

// inspect returns a package's state as seen from service.
func (c *cluster) inspect(service, id string) (etcdstore.Info, result) {
	c.t.Helper()
	r := c.granary(service, "inspect", "--json", id)
	var info etcdstore.Info
	if r.code == 0 {
		if err := json.Unmarshal([]byte(r.out), &info); err != nil {
			c.t.Fatalf("inspect %s: %v\n%s", id, err, r.out)
		}
	}
	return info, r
}

// refHosts lists the hosts holding references to id.
func (c *cluster) refHosts(service, id string) []string {
	c.t.Helper()
	info, r := c.inspect(service, id)
	if r.code != 0 {
		c.t.Fatalf("inspect %s: %s", id, r)
	}
	var hosts []string
	for _, ref := range info.Refs {
		hosts = append(hosts, ref.Host)
	}
	return hosts
}

// waitRefs waits until the hosts holding references to id, as worker1
// sees them, are exactly want, sorted (none if want is empty).
func (c *cluster) waitRefs(id string, want ...string) {
	c.t.Helper()
	c.eventually(takeover, fmt.Sprintf("references to %s held by %v", id, want), func() (bool, string) {
		hosts := c.refHosts("worker1", id)
		slices.Sort(hosts) // etcd lists them by lease
		return slices.Equal(hosts, want), fmt.Sprint(hosts)
	})
}

// eventually polls cond every 500 ms until it holds or the ceiling passes.
func (c *cluster) eventually(ceiling time.Duration, what string, cond func() (bool, string)) {
	c.t.Helper()
	deadline := time.Now().Add(ceiling)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: not within %v; last: %s", what, ceiling, strings.TrimSpace(last))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// dockerDo runs a docker command on a service's container and fails the
// test if it fails ("kill", "pause", "unpause", "stop", "start").
func (c *cluster) dockerDo(verb, service string, extra ...string) {
	c.t.Helper()
	args := append([]string{verb}, extra...)
	args = append(args, c.id(service))
	if out, err := c.docker(context.Background(), args...); err != nil {
		c.t.Fatalf("docker %s %s: %v\n%s", verb, service, err, out)
	}
	c.t.Logf("docker %s %s", verb, service)
}

// network is the project's default network.
func (c *cluster) network() string { return c.project + "_default" }

// killMatching sends SIGTERM to the processes in service's container whose
// command line is pattern or starts with pattern and a space (busybox has
// no pkill), and returns how many it signalled.
func (c *cluster) killMatching(service, pattern string) int {
	c.t.Helper()
	ps := c.exec(context.Background(), service, "ps", "-o", "pid,args")
	n := 0
	for _, line := range strings.Split(ps.out, "\n")[1:] {
		pid, args, ok := strings.Cut(strings.TrimSpace(line), " ")
		if ok && (args == pattern || strings.HasPrefix(args, pattern+" ")) {
			c.exec(context.Background(), service, "kill", pid)
			n++
		}
	}
	return n
}
