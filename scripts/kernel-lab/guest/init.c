/*
 * Kernel-lab /init: a tiny static PID 1 (no busybox, no shell).
 *
 *   1. mounts proc, sysfs, devtmpfs (/dev) and tmpfs (/tmp), brings up lo;
 *   2. creates KLAB_MDEV_COUNT (default 2) mtty mdev instances by writing
 *      fixed UUIDs to /sys/class/mdev_bus/mtty/mdev_supported_types/<type>/create
 *      (type: KLAB_MTTY_TYPE, default mtty-2, falls back to the first type);
 *   3. resolves each instance's sysfs path, VFIO cdev (/dev/vfio/devices/vfioN)
 *      and VFIO group node (/dev/vfio/<group>), and exports them to the entry
 *      as environment variables (KLAB_MDEVS is a JSON array with everything;
 *      KLAB_MDEV<i>_{UUID,TYPE,SYSFS,CDEV,GROUP,GROUP_ID} are the flat form);
 *   4. runs `node /lab/<KLAB_ENTRY>` with cwd /lab; its stdout (line by line)
 *      and stderr go to the console as they are produced, and the LAST stdout
 *      line that starts with '{' is the result (held back, not echoed);
 *   5. prints the result between ===LAB-RESULT-BEGIN=== / ===LAB-RESULT-END===
 *      (a synthesized {"ok":false,...} line if the entry failed to produce
 *      one) and reboots (reboot(2) RESTART; qemu runs with -no-reboot, so
 *      this ends the VM).
 *
 * KLAB_* settings arrive as environment variables: the kernel hands unknown
 * `NAME=value` command-line parameters (without dots) to init's environment.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_MDEVS 8
#define TYPES_DIR "/sys/class/mdev_bus/mtty/mdev_supported_types"

static const char *const uuids[MAX_MDEVS] = {
	"8a9f1c2e-0001-4b6f-9d3a-6b1a2c3d4e01",
	"8a9f1c2e-0002-4b6f-9d3a-6b1a2c3d4e02",
	"8a9f1c2e-0003-4b6f-9d3a-6b1a2c3d4e03",
	"8a9f1c2e-0004-4b6f-9d3a-6b1a2c3d4e04",
	"8a9f1c2e-0005-4b6f-9d3a-6b1a2c3d4e05",
	"8a9f1c2e-0006-4b6f-9d3a-6b1a2c3d4e06",
	"8a9f1c2e-0007-4b6f-9d3a-6b1a2c3d4e07",
	"8a9f1c2e-0008-4b6f-9d3a-6b1a2c3d4e08",
};

struct mdev {
	char uuid[64];
	char type[64];
	char sysfs[PATH_MAX];
	char cdev[PATH_MAX];
	char group[PATH_MAX];
	char group_id[32];
	char error[256];
};

static struct mdev mdevs[MAX_MDEVS];
static int nr_mdevs;
static char setup_error[512];
static struct timespec t_start;

static double uptime_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void logmsg(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "[lab-init %7.2f] ", uptime_s());
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void add_setup_error(const char *fmt, ...)
{
	size_t n = strlen(setup_error);
	va_list ap;

	if (n && n < sizeof(setup_error) - 2) {
		setup_error[n++] = ';';
		setup_error[n++] = ' ';
		setup_error[n] = 0;
	}
	va_start(ap, fmt);
	vsnprintf(setup_error + n, sizeof(setup_error) - n, fmt, ap);
	va_end(ap);
	logmsg("setup error: %s", setup_error + n);
}

static void do_mount(const char *src, const char *dst, const char *fs,
		     unsigned long flags, const char *data)
{
	mkdir(dst, 0755);
	if (mount(src, dst, fs, flags, data) && errno != EBUSY)
		add_setup_error("mount %s on %s: %s", fs, dst, strerror(errno));
}

static int write_file(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = write(fd, val, strlen(val));
	if (n < 0) {
		int e = errno;

		close(fd);
		return -e;
	}
	close(fd);
	return 0;
}

static void lo_up(void)
{
	struct ifreq ifr = { 0 };
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (s < 0)
		return;
	strcpy(ifr.ifr_name, "lo");
	if (!ioctl(s, SIOCGIFFLAGS, &ifr)) {
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		ioctl(s, SIOCSIFFLAGS, &ifr);
	}
	close(s);
}

static int wait_path(const char *path, int ms)
{
	struct stat st;

	for (int waited = 0; waited <= ms; waited += 10) {
		if (!stat(path, &st))
			return 0;
		usleep(10000);
	}
	return -1;
}

/* First entry of `dir` whose name starts with `prefix`, copied to out. */
static int first_entry(const char *dir, const char *prefix, char *out, size_t len)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int rc = -1;

	if (!d)
		return -1;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.' || strncmp(e->d_name, prefix, strlen(prefix)))
			continue;
		snprintf(out, len, "%s", e->d_name);
		rc = 0;
		break;
	}
	closedir(d);
	return rc;
}

static void create_mdevs(void)
{
	const char *want = getenv("KLAB_MTTY_TYPE");
	const char *count_s = getenv("KLAB_MDEV_COUNT");
	char type[64], path[PATH_MAX], link[PATH_MAX];
	struct stat st;
	int count = count_s ? atoi(count_s) : 2;

	if (count < 0 || count > MAX_MDEVS)
		count = 2;
	if (!want || !*want)
		want = "mtty-2";
	if (wait_path(TYPES_DIR, 2000)) {
		add_setup_error("%s missing (mtty driver not registered?)", TYPES_DIR);
		return;
	}
	snprintf(path, sizeof(path), TYPES_DIR "/%s", want);
	if (!stat(path, &st)) {
		snprintf(type, sizeof(type), "%s", want);
	} else if (first_entry(TYPES_DIR, "", type, sizeof(type))) {
		add_setup_error("no mdev types under %s", TYPES_DIR);
		return;
	} else {
		logmsg("mdev type %s not found, using %s", want, type);
	}

	for (int i = 0; i < count; i++) {
		struct mdev *m = &mdevs[nr_mdevs++];
		char real[PATH_MAX], vfio_dev_dir[PATH_MAX], name[64];
		ssize_t n;
		int rc;

		snprintf(m->uuid, sizeof(m->uuid), "%s", uuids[i]);
		snprintf(m->type, sizeof(m->type), "%s", type);
		snprintf(path, sizeof(path), TYPES_DIR "/%s/create", type);
		rc = write_file(path, m->uuid);
		if (rc) {
			snprintf(m->error, sizeof(m->error), "create %s: %s", m->uuid, strerror(-rc));
			add_setup_error("mdev %d: %s", i, m->error);
			continue;
		}
		snprintf(path, sizeof(path), "/sys/bus/mdev/devices/%s", m->uuid);
		if (wait_path(path, 2000) || !realpath(path, real)) {
			snprintf(m->error, sizeof(m->error), "%s did not appear", path);
			add_setup_error("mdev %d: %s", i, m->error);
			continue;
		}
		snprintf(m->sysfs, sizeof(m->sysfs), "%s", real);

		/* VFIO device cdev: <sysfs>/vfio-dev/vfioN -> /dev/vfio/devices/vfioN */
		snprintf(vfio_dev_dir, sizeof(vfio_dev_dir), "%s/vfio-dev", real);
		if (wait_path(vfio_dev_dir, 2000) == 0 &&
		    first_entry(vfio_dev_dir, "vfio", name, sizeof(name)) == 0) {
			snprintf(m->cdev, sizeof(m->cdev), "/dev/vfio/devices/%s", name);
			if (wait_path(m->cdev, 2000))
				add_setup_error("mdev %d: %s missing", i, m->cdev);
		} else {
			add_setup_error("mdev %d: no vfio-dev under %s", i, real);
		}

		/* VFIO group: <sysfs>/iommu_group -> .../iommu_groups/N -> /dev/vfio/N */
		snprintf(path, sizeof(path), "%s/iommu_group", real);
		n = readlink(path, link, sizeof(link) - 1);
		if (n > 0) {
			link[n] = 0;
			snprintf(m->group_id, sizeof(m->group_id), "%s", strrchr(link, '/') + 1);
			snprintf(m->group, sizeof(m->group), "/dev/vfio/%s", m->group_id);
			if (wait_path(m->group, 2000))
				add_setup_error("mdev %d: %s missing", i, m->group);
		} else {
			add_setup_error("mdev %d: no iommu_group link", i);
		}
		logmsg("mdev %d: %s type=%s cdev=%s group=%s", i, m->uuid, m->type,
		       m->cdev[0] ? m->cdev : "-", m->group[0] ? m->group : "-");
	}
}

/* Append s JSON-escaped (without quotes) to buf. */
static void json_esc(char *buf, size_t len, const char *s)
{
	size_t n = strlen(buf);

	for (; *s && n + 8 < len; s++) {
		unsigned char c = *s;

		if (c == '"' || c == '\\') {
			buf[n++] = '\\';
			buf[n++] = c;
		} else if (c < 0x20) {
			n += snprintf(buf + n, len - n, "\\u%04x", c);
		} else {
			buf[n++] = c;
		}
	}
	buf[n] = 0;
}

static void json_kv(char *buf, size_t len, const char *k, const char *v, int comma)
{
	size_t n = strlen(buf);

	snprintf(buf + n, len - n, "%s\"%s\":", comma ? "," : "", k);
	if (!v || !*v) {
		strncat(buf, "null", len - strlen(buf) - 1);
		return;
	}
	strncat(buf, "\"", len - strlen(buf) - 1);
	json_esc(buf, len, v);
	strncat(buf, "\"", len - strlen(buf) - 1);
}

static char mdevs_json[8192];

static void export_env(void)
{
	char key[64];

	strcpy(mdevs_json, "[");
	for (int i = 0; i < nr_mdevs; i++) {
		struct mdev *m = &mdevs[i];

		strncat(mdevs_json, i ? ",{" : "{", sizeof(mdevs_json) - strlen(mdevs_json) - 1);
		json_kv(mdevs_json, sizeof(mdevs_json), "uuid", m->uuid, 0);
		json_kv(mdevs_json, sizeof(mdevs_json), "type", m->type, 1);
		json_kv(mdevs_json, sizeof(mdevs_json), "sysfs", m->sysfs, 1);
		json_kv(mdevs_json, sizeof(mdevs_json), "cdev", m->cdev, 1);
		json_kv(mdevs_json, sizeof(mdevs_json), "group", m->group, 1);
		json_kv(mdevs_json, sizeof(mdevs_json), "groupId", m->group_id, 1);
		json_kv(mdevs_json, sizeof(mdevs_json), "error", m->error, 1);
		strncat(mdevs_json, "}", sizeof(mdevs_json) - strlen(mdevs_json) - 1);

#define SETI(suffix, val) do { \
		snprintf(key, sizeof(key), "KLAB_MDEV%d_" suffix, i); \
		setenv(key, val, 1); \
	} while (0)
		SETI("UUID", m->uuid);
		SETI("TYPE", m->type);
		SETI("SYSFS", m->sysfs);
		SETI("CDEV", m->cdev);
		SETI("GROUP", m->group);
		SETI("GROUP_ID", m->group_id);
#undef SETI
	}
	strncat(mdevs_json, "]", sizeof(mdevs_json) - strlen(mdevs_json) - 1);
	snprintf(key, sizeof(key), "%d", nr_mdevs);
	setenv("KLAB_MDEV_COUNT", key, 1);
	setenv("KLAB_MDEVS", mdevs_json, 1);
	setenv("KLAB_SETUP_ERROR", setup_error, 1);
	setenv("KLAB_PAYLOAD", "/lab", 1);
	setenv("PATH", "/usr/bin:/bin", 1);
	setenv("HOME", "/tmp", 1);
	setenv("TMPDIR", "/tmp", 1);
}

static volatile sig_atomic_t timed_out;
static pid_t child;

static void on_alarm(int sig)
{
	(void)sig;
	timed_out = 1;
	if (child > 0)
		kill(child, SIGKILL);
}

/*
 * The entry's stdout is passed through to the console line by line, except
 * that the most recent line starting with '{' is held back: when the entry
 * exits, the held line is the result and is printed only between the markers.
 */
static char result[1 << 20];
static char linebuf[1 << 20];
static size_t linelen;

static void take_line(void)
{
	size_t n = linelen;

	linebuf[n] = 0;
	linelen = 0;
	while (n && (linebuf[n - 1] == '\r' || linebuf[n - 1] == ' '))
		linebuf[--n] = 0;
	if (linebuf[0] == '{') {
		if (result[0])
			printf("%s\n", result);
		memcpy(result, linebuf, n + 1);
	} else {
		printf("%s\n", linebuf);
	}
}

static void final_reboot(int code)
{
	fflush(stdout);
	fflush(stderr);
	sync();
	logmsg("rebooting (exit code %d)", code);
	reboot(RB_AUTOBOOT);
	/* Not reached; if it is, panic=-1 reboots once PID 1 exits. */
	_exit(code);
}

int main(void)
{
	const char *entry = getenv("KLAB_ENTRY");
	const char *tmo_s = getenv("KLAB_TIMEOUT");
	int tmo = tmo_s ? atoi(tmo_s) : 900;
	char entry_path[PATH_MAX], fail[4096];
	struct utsname uts;
	int pfd[2], status = 0, fd;

	clock_gettime(CLOCK_MONOTONIC, &t_start);
	mkdir("/dev", 0755);
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) && errno != EBUSY)
		add_setup_error("mount devtmpfs on /dev: %s", strerror(errno));
	fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	do_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	do_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	lo_up();
	uname(&uts);
	logmsg("kernel %s; setting up mtty instances", uts.release);

	create_mdevs();
	export_env();

	if (!entry || !*entry)
		entry = "probe.mjs";
	snprintf(entry_path, sizeof(entry_path), "%s%s", entry[0] == '/' ? "" : "/lab/", entry);
	logmsg("running node %s (timeout %ds)", entry_path, tmo);

	if (pipe2(pfd, O_CLOEXEC)) {
		add_setup_error("pipe: %s", strerror(errno));
		goto report;
	}
	child = fork();
	if (child == 0) {
		char *argv[] = { "/usr/bin/node", entry_path, NULL };

		dup2(pfd[1], 1);
		if (chdir("/lab"))
			chdir("/");
		execv(argv[0], argv);
		fprintf(stderr, "exec /usr/bin/node: %s\n", strerror(errno));
		_exit(127);
	}
	close(pfd[1]);
	signal(SIGALRM, on_alarm);
	if (tmo > 0)
		alarm(tmo);
	for (;;) {
		char buf[4096];
		ssize_t n = read(pfd[0], buf, sizeof(buf));

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		for (ssize_t i = 0; i < n; i++) {
			if (buf[i] == '\n')
				take_line();
			else if (linelen < sizeof(linebuf) - 1)
				linebuf[linelen++] = buf[i];
		}
	}
	if (linelen)
		take_line();
	fflush(stdout);
	while (waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
	alarm(0);

report:
	logmsg("entry finished: %s %d%s", WIFSIGNALED(status) ? "signal" : "exit",
	       WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status),
	       timed_out ? " (timed out)" : "");
	if (!result[0] || timed_out || WIFSIGNALED(status)) {
		char why[256];

		if (timed_out)
			snprintf(why, sizeof(why), "entry timed out after %ds", tmo);
		else if (WIFSIGNALED(status))
			snprintf(why, sizeof(why), "entry killed by signal %d", WTERMSIG(status));
		else
			snprintf(why, sizeof(why), "entry exited with %d without a JSON result line",
				 WEXITSTATUS(status));
		fail[0] = 0;
		strcat(fail, "{\"ok\":false");
		json_kv(fail, sizeof(fail), "error", why, 1);
		json_kv(fail, sizeof(fail), "setupError", setup_error, 1);
		json_kv(fail, sizeof(fail), "kernel", uts.release, 1);
		strncat(fail, ",\"mdevs\":", sizeof(fail) - strlen(fail) - 1);
		strncat(fail, mdevs_json[0] ? mdevs_json : "[]", sizeof(fail) - strlen(fail) - 2);
		strncat(fail, "}", sizeof(fail) - strlen(fail) - 1);
		snprintf(result, sizeof(result), "%s", fail);
	}
	printf("\n===LAB-RESULT-BEGIN===\n%s\n===LAB-RESULT-END===\n", result);
	final_reboot(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
	return 0;
}
