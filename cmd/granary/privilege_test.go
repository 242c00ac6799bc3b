package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/granary-build/granary/internal/etcdtest"
)

// Through the node's socket, a job user (the socket's group) may run and
// build but is refused rm, pin, unpin and invalidate (exit 4, the message
// naming the admin group); a member of the admin group is not. Two real
// local users, the CLI run as each of them against a node run as root.
func TestPrivilegeThroughNode(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED LOUDLY: needs root to create two local users (useradd) and run the CLI as each")
	}
	for _, tool := range []string{"useradd", "groupadd", "userdel", "groupdel"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIPPED LOUDLY: no %s to create the test users", tool)
		}
	}
	sfx := strconv.Itoa(os.Getpid() % 100000)
	sockGroup, adminGroup := "gjobs"+sfx, "gadmin"+sfx
	job := makeUser(t, "gjob"+sfx, sockGroup)
	admin := makeUser(t, "gadm"+sfx, sockGroup, adminGroup)

	// Everything the users' processes touch is reachable by them: the
	// binary, the root and the state directory's socket (the node makes
	// the state directory searchable for its socket's group).
	base, err := os.MkdirTemp("", "gpriv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	must(t, os.Chmod(base, 0o755))
	bin := filepath.Join(base, "granary")
	exe, err := os.Executable()
	must(t, err)
	data, err := os.ReadFile(exe)
	must(t, err)
	must(t, os.WriteFile(bin, data, 0o755))
	srv, err := etcdtest.StartServer()
	must(t, err)
	t.Cleanup(srv.Close)
	env := []string{"GRANARY_ENDPOINTS=" + srv.Endpoint, "GRANARY_ROOT=" + filepath.Join(base, "root"),
		"GRANARY_STATE_DIR=" + filepath.Join(base, "st"), "GRANARY_HOST=h", "HOME=" + base, "PATH=" + os.Getenv("PATH")}

	node := exec.Command(bin, "serve", "--linger", "0", "--socket-mode", "0660", "--socket-group", sockGroup, "--admin-group", adminGroup)
	node.Env = env
	var nodeLog bytes.Buffer
	node.Stdout, node.Stderr = &nodeLog, &nodeLog
	must(t, node.Start())
	t.Cleanup(func() {
		node.Process.Signal(syscall.SIGINT)
		node.Wait()
		t.Logf("node log:\n%s", nodeLog.String())
	})
	waitPath(t, filepath.Join(base, "st", "agent.sock"))

	granary := func(u *user.User, args ...string) (int, string) {
		cmd := exec.Command(bin, args...)
		cmd.Env = env
		cmd.Dir = base
		if u != nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: credential(t, u)}
		}
		out, err := cmd.CombinedOutput()
		code := 0
		if xe, ok := err.(*exec.ExitError); ok {
			code = xe.ExitCode()
		} else if err != nil {
			t.Fatalf("granary %v: %v", args, err)
		}
		t.Logf("%s$ granary %s → %d\n%s", name(u), strings.Join(args, " "), code, out)
		return code, string(out)
	}
	if code, out := granary(nil, "build", "pkg", "--", "sh", "-c", `echo data > "$GRANARY_OUT/f"`); code != 0 {
		t.Fatalf("root's build: exit %d: %s", code, out)
	}

	// The job user runs and builds.
	if code, out := granary(job, "run", "pkg", "--", "cat", filepath.Join(base, "root", "pkgs", "pkg", "contents", "f")); code != 0 || !strings.Contains(out, "data") {
		t.Errorf("the job user's run: exit %d, %q; want 0 and the package's data", code, out)
	}
	if code, _ := granary(job, "build", "jobs-pkg", "--", "true"); code != 0 {
		t.Errorf("the job user's build: exit %d, want 0", code)
	}
	// ... and is refused what changes what others rely on.
	for _, args := range [][]string{{"rm", "pkg"}, {"pin", "pkg"}, {"unpin", "pkg"}, {"invalidate", "pkg", "--reason", "x"}} {
		code, out := granary(job, args...)
		want := fmt.Sprintf("granary: %s pkg: refused: only root, the node's user (root) and members of group %s may", args[0], adminGroup)
		if code != 4 || !strings.Contains(out, want) {
			t.Errorf("the job user's %s: exit %d, %q; want 4 and %q", args[0], code, out, want)
		}
	}
	if code, out := granary(nil, "inspect", "pkg"); code != 0 || strings.Contains(out, "pin:") {
		t.Errorf("after the refusals, pkg: exit %d, %q; want it available and unpinned", code, out)
	}

	// The admin group's member is not refused.
	for _, args := range [][]string{{"pin", "pkg", "--note", "n"}, {"unpin", "pkg"}, {"rm", "pkg"}} {
		if code, out := granary(admin, args...); code != 0 {
			t.Errorf("the admin's %s: exit %d, %q; want 0", args[0], code, out)
		}
	}
	if code, _ := granary(nil, "inspect", "pkg"); code != 3 {
		t.Errorf("after the admin's rm, inspect pkg exits %d, want 3", code)
	}
}

// makeUser creates a local user whose primary group is groups[0] and
// supplementary groups the rest (creating the groups), removed at the end.
func makeUser(t *testing.T, name string, groups ...string) *user.User {
	t.Helper()
	for _, g := range groups {
		if _, err := user.LookupGroup(g); err != nil {
			run(t, "groupadd", g)
			t.Cleanup(func() { exec.Command("groupdel", g).Run() })
		}
	}
	args := []string{"-M", "-N", "-s", "/bin/sh", "-g", groups[0]}
	if len(groups) > 1 {
		args = append(args, "-G", strings.Join(groups[1:], ","))
	}
	run(t, "useradd", append(args, name)...)
	// Users go before their groups (cleanups run last-in first-out).
	t.Cleanup(func() { exec.Command("userdel", name).Run() })
	u, err := user.Lookup(name)
	must(t, err)
	return u
}

// credential is u's uid, primary gid and supplementary groups.
func credential(t *testing.T, u *user.User) *syscall.Credential {
	uid, err := strconv.Atoi(u.Uid)
	must(t, err)
	gid, err := strconv.Atoi(u.Gid)
	must(t, err)
	c := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	gids, err := u.GroupIds()
	must(t, err)
	for _, g := range gids {
		n, err := strconv.Atoi(g)
		must(t, err)
		c.Groups = append(c.Groups, uint32(n))
	}
	return c
}

func name(u *user.User) string {
	if u == nil {
		return "root"
	}
	return u.Username
}

func run(t *testing.T, prog string, args ...string) {
	t.Helper()
	if out, err := exec.Command(prog, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", prog, args, err, out)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// waitPath waits, at most 60 s, for a node to create path (its socket): a
// bounded poll, as the scripts' waitfile.
func waitPath(t *testing.T, path string) {
	t.Helper()
	for range 1200 {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s did not appear within 60s", path)
}
