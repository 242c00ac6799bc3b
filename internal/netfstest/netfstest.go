// Package netfstest mounts one directory several times through sshfs, so a
// test can give each of several stores its own client of one shared
// "network file system", each with its own cache, the way NFS clients on
// different hosts see one export.
//
// The file server is a private sshd (Debian's openssh-server) listening on
// 127.0.0.1 on a free port, with its own host key and client key under a
// temporary directory; each mount is one sshfs process in the foreground.
// Everything is stopped by t.Cleanup: the mounts are unmounted
// (fusermount -u, lazily if still busy), the sshfs processes waited for,
// and sshd killed by its pid.
//
// The test is skipped, loudly, only when FUSE, sshfs or sshd is missing on
// the machine; any other failure to mount fails the test.
//
// See shared/reference/nfs.md (in the project's notes) and docs/design.md
// for how the NFS-like mode compares with a real NFS client.
package netfstest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// NFSLike are sshfs options that make a mount behave like an NFS client
// mounted with actimeo=30,lookupcache=all: entries, attributes and negative
// lookups are trusted for 30 s, listings are not cached, and file data is
// read from the server on every open (close-to-open, as NFS gives it).
const NFSLike = "dir_cache=no,direct_io,entry_timeout=30,attr_timeout=30,negative_timeout=30"

// DefaultMode is sshfs with its own defaults: a 20 s listing cache that
// opening a directory does not revalidate (worse than NFS). Use it only to
// test that Granary detects and warns about it.
const DefaultMode = ""

// Config says how to mount.
type Config struct {
	// Hosts is the number of mounts of the export (default 3).
	Hosts int
	// Options are the sshfs -o options of every mount (NFSLike,
	// DefaultMode or anything else sshfs accepts).
	Options string
	// NoHardLinks mounts with disable_hardlink: link(2) fails, as on file
	// systems that have no hard links.
	NoHardLinks bool
	// AllowOther mounts with allow_other, so that other users (and
	// containers the mounts are bind-mounted into) can use them.
	AllowOther bool
}

// Export is one exported directory and its mounts.
type Export struct {
	// Dir is the exported directory itself (the server's view).
	Dir string
	// Hosts are the mount points, one per simulated host: Work/hostA,
	// Work/hostB, ...
	Hosts []string
	// Work is the directory that holds the mount points.
	Work string

	t      testing.TB
	work   string
	mu     sync.Mutex
	sshfs  []*exec.Cmd
	waited []chan struct{}
}

// Mount starts a file server and mounts its export cfg.Hosts times with
// cfg.Options. Everything stops at the end of the test.
func Mount(t testing.TB, cfg Config) *Export {
	t.Helper()
	if cfg.Hosts == 0 {
		cfg.Hosts = 3
	}
	if why := missing(); why != "" {
		t.Skipf("\n\n!!!!! SKIPPED: %s, so this test does NOT run on a network file system.\n"+
			"!!!!! Install openssh-server and sshfs (Debian), and run where /dev/fuse is usable.\n", why)
	}
	// Short paths: sshd and the mounts do not care, but people reading logs do.
	work, err := os.MkdirTemp("", "netfs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	e := &Export{Dir: filepath.Join(work, "export"), Work: work, t: t, work: work}
	if err := os.MkdirAll(e.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sshConfig := e.startServer()
	opts := cfg.Options
	if cfg.NoHardLinks {
		opts = joinOpts(opts, "disable_hardlink")
	}
	if cfg.AllowOther {
		opts = joinOpts(opts, "allow_other")
	}
	for i := range cfg.Hosts {
		mp := filepath.Join(work, "host"+string(rune('A'+i)))
		if err := os.MkdirAll(mp, 0o755); err != nil {
			t.Fatal(err)
		}
		e.mount(sshConfig, mp, opts)
		e.Hosts = append(e.Hosts, mp)
	}
	return e
}

func joinOpts(a, b string) string {
	if a == "" {
		return b
	}
	return a + "," + b
}

// missing says what the machine lacks for sshfs mounts, or "".
func missing() string {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return "/dev/fuse is missing (no FUSE)"
	}
	for _, bin := range []string{"sshfs", "fusermount"} {
		if _, err := exec.LookPath(bin); err != nil {
			return bin + " is not installed"
		}
	}
	if _, err := os.Stat(sshdPath); err != nil {
		return sshdPath + " is not installed (openssh-server)"
	}
	return ""
}

const sshdPath = "/usr/sbin/sshd"

// startServer starts sshd on a free port of 127.0.0.1 and returns the path
// of an ssh_config whose host "nfs" reaches it.
func (e *Export) startServer() string {
	t := e.t
	w := e.work
	for _, k := range []string{"hostkey", "clientkey"} {
		out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(w, k)).CombinedOutput()
		if err != nil {
			t.Fatalf("netfstest: ssh-keygen: %v: %s", err, out)
		}
	}
	// sshd needs its privilege-separation directory.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil && os.Geteuid() == 0 {
		t.Fatalf("netfstest: %v", err)
	}
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	var lastErr error
	for range 5 { // a free port can be taken between the probe and sshd's bind
		port, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		pidFile := filepath.Join(w, "sshd.pid")
		conf := filepath.Join(w, "sshd_config")
		write(t, conf, fmt.Sprintf(`Port %d
ListenAddress 127.0.0.1
HostKey %s/hostkey
PidFile %s
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile %s/clientkey.pub
StrictModes no
Subsystem sftp internal-sftp
MaxStartups 50:30:100
MaxSessions 50
`, port, w, pidFile, w))
		cmd := exec.Command(sshdPath, "-D", "-f", conf, "-E", filepath.Join(w, "sshd.log"))
		if err := cmd.Start(); err != nil {
			t.Fatalf("netfstest: start sshd: %v", err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() {
			cmd.Process.Kill() //nolint:errcheck // it may have exited
			<-exited
		})
		if lastErr = waitListening(port, exited); lastErr != nil {
			continue
		}
		sshConfig := filepath.Join(w, "ssh_config")
		write(t, sshConfig, fmt.Sprintf(`Host nfs
  HostName 127.0.0.1
  Port %d
  User %s
  IdentityFile %s/clientkey
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
`, port, u.Username, w))
		return sshConfig
	}
	log, _ := os.ReadFile(filepath.Join(w, "sshd.log"))
	t.Fatalf("netfstest: sshd did not start: %v\n%s", lastErr, log)
	return ""
}

func write(t testing.TB, path, s string) {
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitListening waits until something accepts on port, or sshd exits.
func waitListening(port int, exited <-chan error) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("sshd exited: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return errors.New("sshd does not accept connections after 10s")
}

// mount runs one sshfs in the foreground and waits until its mount is in
// /proc/self/mountinfo.
func (e *Export) mount(sshConfig, mp, opts string) {
	t := e.t
	args := []string{"-f", "-F", sshConfig, "nfs:" + e.Dir, mp}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	cmd := exec.Command("sshfs", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("netfstest: sshfs: %v", err)
	}
	done := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(done) }()
	e.mu.Lock()
	e.sshfs = append(e.sshfs, cmd)
	e.waited = append(e.waited, done)
	e.mu.Unlock()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGCONT) //nolint:errcheck // in case a test stopped it
		if out, err := exec.Command("fusermount", "-u", mp).CombinedOutput(); err != nil {
			t.Logf("netfstest: fusermount -u %s: %v: %s; unmounting lazily", mp, err, out)
			exec.Command("fusermount", "-u", "-z", mp).Run() //nolint:errcheck // best effort; the kill below ends the mount
		}
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill() //nolint:errcheck
			<-done
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		if mounted(mp) {
			return
		}
		select {
		case <-done:
			msg := stderr.String()
			if strings.Contains(msg, "fuse: device not found") || strings.Contains(msg, "Operation not permitted") ||
				strings.Contains(msg, "Permission denied") && strings.Contains(msg, "fuse") {
				t.Skipf("\n\n!!!!! SKIPPED: FUSE is not usable here (%s), so this test does NOT run on a network file system.\n", strings.TrimSpace(msg))
			}
			t.Fatalf("netfstest: sshfs %s exited: %v: %s", mp, waitErr, msg)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("netfstest: %s not mounted after 15s: %s", mp, stderr.String())
		}
	}
}

// mounted reports whether mp is a mount point in this process's namespace.
func mounted(mp string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == mp {
			return true
		}
	}
	return false
}

// Stop freezes host i's sshfs (SIGSTOP): to that host the file server hangs,
// as a hard-mounted NFS server that stopped answering. Cleanup resumes it.
func (e *Export) Stop(i int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.sshfs[i].Process.Signal(syscall.SIGSTOP); err != nil {
		e.t.Fatalf("netfstest: stop host %d: %v", i, err)
	}
}

// Continue resumes host i's sshfs after Stop.
func (e *Export) Continue(i int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.sshfs[i].Process.Signal(syscall.SIGCONT); err != nil {
		e.t.Fatalf("netfstest: continue host %d: %v", i, err)
	}
}

// Path returns rel under host i's mount point.
func (e *Export) Path(i int, rel ...string) string {
	return filepath.Join(append([]string{e.Hosts[i]}, rel...)...)
}
