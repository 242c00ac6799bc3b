package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/gofrs/flock"

	"github.com/granary-build/granary/node"
	"github.com/granary-build/granary/node/csidriver"
)

// startTimeout bounds how long the CLI waits for a node it started.
const startTimeout = 60 * time.Second

// ensureLocalNode returns once a local node serves cfg.StateDir, starting
// one in the background if there is none. The start lock makes concurrent
// first uses start exactly one node: the first starts it and waits until it
// is ready; the others wait for the lock and then find it running.
func (e *env) ensureLocalNode(ctx context.Context, cfg node.Config) error {
	if _, err := node.ReadLocal(cfg.StateDir); err == nil {
		return nil
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("granary: state directory: %w", err)
	}
	lctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	fl := flock.New(filepath.Join(cfg.StateDir, node.StartLockFile))
	if ok, err := fl.TryLockContext(lctx, 20*time.Millisecond); !ok || err != nil {
		return fmt.Errorf("granary: waiting for another command to start the local node (lock %s): %w", fl.Path(), err)
	}
	defer fl.Unlock()
	if _, err := node.ReadLocal(cfg.StateDir); err == nil {
		return nil // started while we waited for the lock
	}
	pid, err := startNode(lctx, cfg)
	if err != nil {
		return err
	}
	idle := cfg.IdleTimeout
	if idle == 0 {
		idle = node.DefaultIdleTimeout
	}
	fmt.Fprintf(e.stderr, "granary: started the local node (pid %d, state %s, log %s; it stops after %v idle, or: granary node stop)\n",
		pid, cfg.StateDir, filepath.Join(cfg.StateDir, node.LogFile), idle)
	if l, err := node.ReadLocal(cfg.StateDir); err == nil && l.CreatedRoot {
		// As a CLI with its own store says it (cli.go): the node made it.
		fmt.Fprintf(e.stderr, "granary: created the shared root %s (it did not exist)\n", l.Root)
	}
	return nil
}

// startNode re-executes this program as `granary serve` in a new session,
// detached, logging to <state>/node.log, and waits until it is ready. It
// returns the node's pid.
func startNode(ctx context.Context, cfg node.Config) (int, error) {
	idle := cfg.IdleTimeout
	if idle == 0 {
		idle = node.DefaultIdleTimeout
	}
	exe, err := os.Executable()
	if err != nil {
		return 0, fmt.Errorf("granary: cannot find own executable to start the local node: %w", err)
	}
	logPath := filepath.Join(cfg.StateDir, node.LogFile)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, fmt.Errorf("granary: node log: %w", err)
	}
	defer logf.Close()
	off, _ := logf.Seek(0, 2)
	cmd := &exec.Cmd{
		Path: exe,
		Args: []string{"granary", "serve",
			"--root", cfg.Root, "--state-dir", cfg.StateDir, "--prefix", cfg.Prefix,
			"--ttl", strconv.Itoa(int(cfg.TTL / time.Second)), "--host", cfg.Name,
			"--idle-timeout", idle.String()},
		Env:         append(os.Environ(), node.EnvEndpoints+"="),
		Stdout:      logf,
		Stderr:      logf,
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("granary: start local node: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// Readiness is node.json plus a socket that accepts; the node writes the
	// file only once etcd serves and its store is open.
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if l, err := node.ReadLocal(cfg.StateDir); err == nil {
			return l.PID, nil
		}
		select {
		case err := <-exited:
			if l, rerr := node.ReadLocal(cfg.StateDir); rerr == nil {
				return l.PID, nil // another node won the state directory
			}
			tail := logTail(logPath, off)
			hint := ""
			if f, ok := node.ReadStartFailure(cfg.StateDir, cmd.Process.Pid); ok && f.Code == node.StartFailForeignCluster {
				hint = fmt.Sprintf("\nthe shared root %s belongs to another etcd cluster than the local node's (in %s): "+
					"pass --endpoints of the cluster that owns it, or --root for another root", cfg.Root, cfg.StateDir)
			}
			return 0, fmt.Errorf("granary: the local node exited (%v) before it was ready:\n%s(log: %s)%s", err, tail, logPath, hint)
		case <-ctx.Done():
			cmd.Process.Kill()
			return 0, fmt.Errorf("granary: the local node was not ready after %v (log: %s): %w", startTimeout, logPath, ctx.Err())
		case <-t.C:
		}
	}
}

// logTail returns what the log got after offset off, at most 2 KiB.
func logTail(path string, off int64) string {
	b, err := os.ReadFile(path)
	if err != nil || int64(len(b)) < off {
		return ""
	}
	b = b[off:]
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return string(bytes.TrimLeft(b, "\n"))
}

func cmdServe(ctx context.Context, e *env, args []string) error {
	f, err := e.newFlags("serve", false)
	if err != nil {
		return err
	}
	f.cfg.RegisterNodeFlags(f.FlagSet)
	csiCfg := csidriver.DefaultConfig()
	f.StringVar(&csiCfg.Endpoint, "csi-endpoint", "", "serve the Kubernetes CSI node plugin on this socket (unix:///PATH; empty: off)")
	f.StringVar(&csiCfg.Name, "csi-driver-name", csiCfg.Name, "the CSI driver name (the CSIDriver object's name)")
	if pos, cmd, err := e.parse(f, args); err != nil {
		return err
	} else if len(pos)+len(cmd) > 0 {
		return usageErr("serve", "unexpected argument %q", append(pos, cmd...)[0])
	}
	if err := f.cfg.Validate(); err != nil {
		return &ExitErr{Code: ExitUsage, Err: err}
	}
	if csiCfg.Endpoint != "" {
		if err := csiCfg.Validate(); err != nil {
			return &ExitErr{Code: ExitUsage, Err: err}
		}
	}
	log := slog.New(slog.NewTextHandler(e.stderr, nil))
	n, err := node.New(ctx, f.cfg, log)
	if err != nil {
		return err
	}
	if csiCfg.Endpoint == "" {
		return n.Run(ctx)
	}
	return serveCSI(ctx, n, csiCfg, log)
}

// serveCSI runs n with its CSI node plugin (csidriver.Driver.Serve).
func serveCSI(ctx context.Context, n *node.Node, cfg csidriver.Config, log *slog.Logger) error {
	d, err := csidriver.New(n, cfg, log)
	if err == nil {
		err = d.Recover(ctx)
	}
	if err != nil {
		n.Close()
		return err
	}
	return d.Serve(ctx)
}

func cmdNode(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		fmt.Fprintf(e.stdout, "usage: granary node status [--json] | granary node stop\n\n%s.\n", commands["node"].short)
		return nil
	}
	if len(args) == 0 || (args[0] != "status" && args[0] != "stop") {
		return usageErr("node", "want 'status' or 'stop'")
	}
	sub := args[0]
	f, err := e.newFlags("node", sub == "status")
	if err != nil {
		return err
	}
	if pos, cmd, err := e.parse(f, args[1:]); err != nil {
		return err
	} else if len(pos)+len(cmd) > 0 {
		return usageErr("node", "unexpected argument %q", append(pos, cmd...)[0])
	}
	if f.cfg.StateDir == "" {
		return &ExitErr{Code: ExitUsage, Err: errors.New("granary: no state directory (set --state-dir or $GRANARY_STATE_DIR)")}
	}
	l, err := node.ReadLocal(f.cfg.StateDir)
	if sub == "stop" {
		if err != nil {
			fmt.Fprintf(e.stderr, "granary: no local node is running (state dir %s)\n", f.cfg.StateDir)
			return nil
		}
		return stopLocal(ctx, e, f.cfg.StateDir, l)
	}
	if err != nil {
		return err
	}
	if f.json {
		return writeJSON(e.stdout, struct {
			node.Local
			Uptime string `json:"uptime"`
		}{l, time.Since(l.Started).Round(time.Second).String()})
	}
	fmt.Fprintf(e.stdout, "local node running\n  pid:       %d\n  socket:    %s\n  agent:     %s\n  state dir: %s\n  root:      %s\n  uptime:    %s\n",
		l.PID, l.Socket, l.Agent, l.StateDir, l.Root, time.Since(l.Started).Round(time.Second))
	if l.Metrics != "" {
		fmt.Fprintf(e.stdout, "  metrics:   http://%s/metrics\n", l.Metrics)
	}
	return nil
}

// stopLocal sends the node SIGTERM and waits until it has released the
// state directory's lock, which it does last.
func stopLocal(ctx context.Context, e *env, stateDir string, l node.Local) error {
	p, err := os.FindProcess(l.PID)
	if err == nil {
		err = p.Signal(syscall.SIGTERM)
	}
	if err != nil {
		return fmt.Errorf("granary: stop local node pid %d: %w", l.PID, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	fl := flock.New(filepath.Join(stateDir, node.LockFile))
	if ok, err := fl.TryLockContext(ctx, 20*time.Millisecond); !ok || err != nil {
		return fmt.Errorf("granary: local node pid %d did not stop: %w", l.PID, err)
	}
	fl.Unlock()
	// The node lets go of its lock before its last clean-up: "stopped"
	// is said once the process is gone.
	if err := waitExit(ctx, l.PID); err != nil {
		return fmt.Errorf("granary: local node pid %d released its state directory but has not exited: %w", l.PID, err)
	}
	fmt.Fprintf(e.stderr, "granary: stopped local node (pid %d)\n", l.PID)
	return nil
}

func writeJSON(w interface{ Write([]byte) (int, error) }, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
