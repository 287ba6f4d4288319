!> lodas_bridge: the Fortran side of the lodas coupling.
!>
!> A host model `use`s this module and calls, in order:
!>
!>   lodas_init                 split the world communicator, read &bridge_nml, connect to the driver
!>   lodas_define_decomposition describe this rank's piece of the global grid; handshake with the driver
!>   lodas_put_background       at each analysis time: hand the background to the driver (Gatherv)
!>   lodas_get_increment        fetch the analysis increment and a status (Scatterv)
!>   lodas_finalize             tell the driver the run is over; disconnect
!>
!> The host keeps computing between put and get if it likes (asynchronous coupling).
!> Every routine returns a status (0 = LODAS_OK) and a message; nothing stops silently.
!> A non-zero status from lodas_get_increment always comes with a zero increment.
!>
!> Message layout (one collective each way per cycle, no pickling, no extra latency):
!>   host -> driver, MPI_Igatherv over the intercommunicator: per rank
!>        [header(LODAS_HDR) | packed state(local_size)]
!>        header = [command, step, model_time, host_put_s, host_get_s, host_error, 0, 0]
!>   driver -> host, MPI_Iscatterv: per rank [header(LODAS_HDR) | packed increment(local_size)]
!>        header = [status, cycle, 0, ...]
!> Packing: for v = 1..nvar, the box counts(1,v) x counts(2,v) of variable v in Fortran order.
!> Waits are bounded by &bridge_nml deadline_s: a pending collective cannot be cancelled in MPI,
!> so a missed deadline aborts the job with a message instead of hanging it. A wait polls
!> (MPI_Test) without sleeping for spin_s seconds, then with 0.2 ms naps (usleep) so that an
!> oversubscribed node's cores go to the ranks being waited for; with ranks <= cores a large
!> spin_s gives the latency of a blocking wait.
module lodas_bridge
   use, intrinsic :: iso_c_binding, only: c_int
   use, intrinsic :: iso_fortran_env, only: error_unit, output_unit
   use mpi
   implicit none
   private

   integer, parameter, public :: lodas_dp = kind(1.0d0)

   !> Status codes; the same values as bridges/status.py (a test checks it).
   integer, parameter, public :: LODAS_OK = 0
   integer, parameter, public :: LODAS_NO_OBSERVATIONS = 1
   integer, parameter, public :: LODAS_BAD_BACKGROUND = 2
   integer, parameter, public :: LODAS_ANALYSIS_FAILED = 3
   integer, parameter, public :: LODAS_BAD_INCREMENT = 4
   integer, parameter, public :: LODAS_NO_BACKGROUND = 5   !< replay only (lodas replay): archive unreadable
   integer, parameter, public :: LODAS_CONFIG_ERROR = 10
   integer, parameter, public :: LODAS_TIMEOUT = 11
   integer, parameter, public :: LODAS_PROTOCOL_ERROR = 12

   integer, parameter, public :: LODAS_NAME_LEN = 32   !< length of model and variable names on the wire
   integer, parameter, public :: LODAS_MSG_LEN = 512   !< length of messages on the wire
   integer, parameter :: LODAS_PROTOCOL_VERSION = 1
   integer, parameter :: LODAS_HDR = 8
   integer, parameter :: TAG_HANDSHAKE = 7301
   integer, parameter :: CMD_CYCLE = 1, CMD_FINALIZE = 2
   integer, parameter :: COLOR_HOST = 0, COLOR_DRIVER = 1

   !> The coupling context of one host rank.
   type, public :: lodas_ctx
      integer :: world_comm = MPI_COMM_NULL   !< the communicator given to lodas_init
      integer :: host_comm = MPI_COMM_NULL    !< the host's own communicator (returned by lodas_init)
      integer :: inter_comm = MPI_COMM_NULL   !< intercommunicator host group <-> driver group
      integer :: host_rank = -1, host_size = 0, driver_size = 0
      integer :: nvar = 0, local_size = 0
      ! &bridge_nml (the same keys as bridges/namelist.py BridgeNml)
      character(len=16) :: increment_mode = 'direct'   !< 'direct' or 'iau'
      integer :: iau_steps = 1                         !< IAU window in model steps
      real(lodas_dp) :: deadline_s = 600.0_lodas_dp    !< longest wait for the driver, s
      character(len=16) :: on_failure = 'continue'     !< 'continue' or 'abort'
      real(lodas_dp) :: spin_s = 2.0e-3_lodas_dp        !< busy polling before naps, s
      logical :: connected = .false., pending = .false.
      real(lodas_dp) :: put_s = 0, get_s = 0           !< wall time of the last put / get
      real(lodas_dp), allocatable, private :: sbuf(:), rbuf(:)
   end type lodas_ctx

   public :: lodas_init, lodas_define_decomposition, lodas_put_background, lodas_get_increment
   public :: lodas_finalize, lodas_fail, lodas_status_name, lodas_iau_weight

   interface
      function c_usleep(usec) bind(C, name='usleep') result(rc)
         import :: c_int
         integer(c_int), value :: usec
         integer(c_int) :: rc
      end function c_usleep
   end interface

contains

   !> Split `world_comm` into the host and driver groups, read &bridge_nml from `nml_file`
   !> and connect to the driver. Collective over `world_comm` (host and driver ranks).
   subroutine lodas_init(ctx, nml_file, world_comm, host_comm, status, errmsg)
      type(lodas_ctx), intent(inout) :: ctx
      character(len=*), intent(in) :: nml_file     !< the namelist file shared with the driver
      integer, intent(in) :: world_comm            !< communicator holding host and driver ranks
      integer, intent(out) :: host_comm            !< the host's own communicator: use it, not world_comm
      integer, intent(out) :: status              !< LODAS_OK or LODAS_CONFIG_ERROR
      character(len=*), intent(out) :: errmsg      !< why, when status /= LODAS_OK
      integer :: ierr, world_rank, leaders(2), mine(2)

      status = LODAS_OK
      errmsg = ''
      host_comm = MPI_COMM_NULL
      ctx%world_comm = world_comm
      call read_bridge_nml(ctx, nml_file, status, errmsg)   ! an error travels to the driver below

      call MPI_Comm_rank(world_comm, world_rank, ierr)
      call MPI_Comm_split(world_comm, COLOR_HOST, world_rank, ctx%host_comm, ierr)
      call MPI_Comm_rank(ctx%host_comm, ctx%host_rank, ierr)
      call MPI_Comm_size(ctx%host_comm, ctx%host_size, ierr)
      host_comm = ctx%host_comm
      ! Leaders (lowest world rank of each group); the driver does the same reduction.
      mine = [world_rank, huge(1)]
      call MPI_Allreduce(mine, leaders, 2, MPI_INTEGER, MPI_MIN, world_comm, ierr)
      if (leaders(2) == huge(1)) then
         status = LODAS_CONFIG_ERROR
         errmsg = 'lodas_init: no lodas driver ranks in the communicator; launch with '// &
                  '"mpiexec -n A <host> FILE.nml : -n B python -m coupler run FILE.nml"'
         return
      end if
      call MPI_Intercomm_create(ctx%host_comm, 0, world_comm, leaders(2), TAG_HANDSHAKE, &
                                ctx%inter_comm, ierr)
      call MPI_Comm_remote_size(ctx%inter_comm, ctx%driver_size, ierr)
      ctx%connected = .true.
      if (status /= LODAS_OK) then   ! tell the driver, so that both sides stop with the message
         call handshake(ctx, 'unknown', [character(len=LODAS_NAME_LEN) ::], 0, 0, &
                        reshape([integer ::], [0, 0]), status, errmsg)
         status = LODAS_CONFIG_ERROR
      end if
   end subroutine lodas_init

   !> Describe this rank's piece of the global grid and check it with the driver.
   !> Collective over the host ranks and the driver. Both sides stop on a mismatch.
   subroutine lodas_define_decomposition(ctx, model_name, var_names, nx, ny, starts, counts, status, errmsg)
      type(lodas_ctx), intent(inout) :: ctx
      character(len=*), intent(in) :: model_name     !< e.g. 'l96', 'sw'
      character(len=*), intent(in) :: var_names(:)   !< variable names, in packing order
      integer, intent(in) :: nx, ny                  !< global grid size (fastest index first)
      integer, intent(in) :: starts(:, :)            !< (2, nvar) 1-based global (i, j) of this rank's box
      integer, intent(in) :: counts(:, :)            !< (2, nvar) extents (ni, nj) of this rank's box
      integer, intent(out) :: status
      character(len=*), intent(out) :: errmsg
      integer :: v

      if (.not. ctx%connected .or. allocated(ctx%sbuf)) then
         status = LODAS_PROTOCOL_ERROR
         errmsg = 'lodas_define_decomposition: call lodas_init first (once), and check its status'
         return
      end if
      errmsg = ''
      status = LODAS_OK
      if (any(shape(starts) /= [2, size(var_names)]) .or. any(shape(counts) /= [2, size(var_names)])) then
         status = LODAS_CONFIG_ERROR
         errmsg = 'starts and counts must have shape (2, nvar)'
      end if
      call handshake(ctx, model_name, var_names, nx, ny, counts, status, errmsg, starts)
      if (status /= LODAS_OK) return
      ctx%nvar = size(var_names)
      ctx%local_size = 0
      do v = 1, ctx%nvar
         ctx%local_size = ctx%local_size + counts(1, v)*counts(2, v)
      end do
      allocate (ctx%sbuf(LODAS_HDR + ctx%local_size), ctx%rbuf(LODAS_HDR + ctx%local_size))
   end subroutine lodas_define_decomposition

   !> The init handshake. The host root sends [version, status, nvar, nx, ny, host ranks], the
   !> names and a message; unless that status is an error, every host rank then sends its box
   !> [i0, ni, j0, nj] per variable (MPI_Gather); the driver answers every host rank with its
   !> verdict and message (MPI_Bcast). On an error the intercommunicator is freed.
   subroutine handshake(ctx, model_name, var_names, nx, ny, counts, status, errmsg, starts)
      type(lodas_ctx), intent(inout) :: ctx
      character(len=*), intent(in) :: model_name, var_names(:)
      integer, intent(in) :: nx, ny, counts(:, :)
      integer, intent(inout) :: status               !< in: the host's own verdict; out: the driver's
      character(len=*), intent(inout) :: errmsg
      integer, intent(in), optional :: starts(:, :)
      integer :: ierr, v, nvar, hdr(8), verdict(2)
      integer, allocatable :: desc(:)
      character(len=LODAS_NAME_LEN), allocatable :: names(:)
      character(len=LODAS_MSG_LEN) :: msg

      nvar = size(var_names)
      msg = errmsg
      hdr = [LODAS_PROTOCOL_VERSION, status, nvar, nx, ny, ctx%host_size, 0, 0]
      if (ctx%host_rank == 0) then
         allocate (names(0:nvar))
         names(0) = model_name
         do v = 1, nvar
            names(v) = var_names(v)
         end do
         call MPI_Send(hdr, 8, MPI_INTEGER, 0, TAG_HANDSHAKE, ctx%inter_comm, ierr)
         call MPI_Send(names, LODAS_NAME_LEN*(nvar + 1), MPI_CHARACTER, 0, TAG_HANDSHAKE, ctx%inter_comm, ierr)
         call MPI_Send(msg, LODAS_MSG_LEN, MPI_CHARACTER, 0, TAG_HANDSHAKE, ctx%inter_comm, ierr)
      end if
      if (status == LODAS_OK) then
         allocate (desc(4*nvar))
         do v = 1, nvar
            desc(4*v - 3:4*v) = [starts(1, v), counts(1, v), starts(2, v), counts(2, v)]
         end do
         call MPI_Gather(desc, 4*nvar, MPI_INTEGER, desc, 4*nvar, MPI_INTEGER, 0, ctx%inter_comm, ierr)
      end if
      call MPI_Bcast(verdict, 2, MPI_INTEGER, 0, ctx%inter_comm, ierr)
      call MPI_Bcast(msg, LODAS_MSG_LEN, MPI_CHARACTER, 0, ctx%inter_comm, ierr)
      if (verdict(1) /= LODAS_OK) then
         status = verdict(1)
         errmsg = msg
         call MPI_Comm_free(ctx%inter_comm, ierr)
         ctx%connected = .false.
      end if
   end subroutine handshake

   !> Hand this rank's piece of the background to the driver. Returns once it is sent.
   subroutine lodas_put_background(ctx, state, step, model_time, status, errmsg)
      type(lodas_ctx), intent(inout) :: ctx
      real(lodas_dp), intent(in) :: state(:)   !< packed local state, size ctx%local_size
      integer, intent(in) :: step              !< model step count at the analysis time
      real(lodas_dp), intent(in) :: model_time !< model time at the analysis time (host units)
      integer, intent(out) :: status
      character(len=*), intent(out) :: errmsg
      real(lodas_dp) :: t0

      status = LODAS_OK
      errmsg = ''
      if (.not. allocated(ctx%sbuf) .or. .not. ctx%connected) then
         status = LODAS_PROTOCOL_ERROR
         errmsg = 'lodas_put_background: call lodas_init and lodas_define_decomposition first'
         return
      end if
      if (ctx%pending) then
         status = LODAS_PROTOCOL_ERROR
         errmsg = 'lodas_put_background: the previous increment was not fetched (call lodas_get_increment)'
         return
      end if
      t0 = MPI_Wtime()
      ctx%sbuf(1:LODAS_HDR) = [real(CMD_CYCLE, lodas_dp), real(step, lodas_dp), model_time, &
                               ctx%put_s, ctx%get_s, 0.0_lodas_dp, 0.0_lodas_dp, 0.0_lodas_dp]
      if (size(state) /= ctx%local_size) then
         ! Stay in step with the other ranks and the driver: send zeros, flag the error.
         ctx%sbuf(6) = real(size(state), lodas_dp) + 1.0_lodas_dp
         ctx%sbuf(LODAS_HDR + 1:) = 0.0_lodas_dp
      else
         ctx%sbuf(LODAS_HDR + 1:) = state
      end if
      call exchange(ctx, send=.true., what='lodas_put_background')
      ctx%pending = .true.
      ctx%put_s = MPI_Wtime() - t0
   end subroutine lodas_put_background

   !> Fetch the analysis increment of the last put. Blocks until the driver answers or the
   !> deadline passes (then the job is aborted with a message: MPI cannot cancel the exchange).
   subroutine lodas_get_increment(ctx, increment, status, errmsg)
      type(lodas_ctx), intent(inout) :: ctx
      real(lodas_dp), intent(out) :: increment(:)   !< packed local increment; zero unless LODAS_OK
      integer, intent(out) :: status
      character(len=*), intent(out) :: errmsg
      real(lodas_dp) :: t0

      increment = 0.0_lodas_dp
      errmsg = ''
      if (.not. ctx%pending) then
         status = LODAS_PROTOCOL_ERROR
         errmsg = 'lodas_get_increment: no background was put since the last increment'
         return
      end if
      t0 = MPI_Wtime()
      call exchange(ctx, send=.false., what='lodas_get_increment')
      ctx%pending = .false.
      status = nint(ctx%rbuf(1))
      if (status == LODAS_OK .and. size(increment) /= ctx%local_size) then
         status = LODAS_PROTOCOL_ERROR
         write (errmsg, '(a,i0,a,i0)') 'lodas_get_increment: increment has size ', size(increment), &
            '; this rank holds ', ctx%local_size
      else if (status == LODAS_OK) then
         increment = ctx%rbuf(LODAS_HDR + 1:)
      else
         write (errmsg, '(a,i0,a,i0,3a)') 'lodas: analysis of cycle ', nint(ctx%rbuf(2)), &
            ' returned status ', status, ' (', trim(lodas_status_name(status)), &
            '): zero increment; details in the driver log'
      end if
      ctx%get_s = MPI_Wtime() - t0
   end subroutine lodas_get_increment

   !> Tell the driver the run is over and disconnect. `host_comm` stays valid for the host.
   subroutine lodas_finalize(ctx, status, errmsg)
      type(lodas_ctx), intent(inout) :: ctx
      integer, intent(out) :: status
      character(len=*), intent(out) :: errmsg
      integer :: ierr

      status = LODAS_OK
      errmsg = ''
      if (.not. ctx%connected) return
      if (ctx%pending) then
         status = LODAS_PROTOCOL_ERROR
         errmsg = 'lodas_finalize: an increment was not fetched; fetching and discarding it'
         call exchange(ctx, send=.false., what='lodas_finalize')
         ctx%pending = .false.
      end if
      if (allocated(ctx%sbuf)) then
         ctx%sbuf = 0.0_lodas_dp
         ctx%sbuf(1:5) = [real(CMD_FINALIZE, lodas_dp), 0.0_lodas_dp, 0.0_lodas_dp, ctx%put_s, ctx%get_s]
         call exchange(ctx, send=.true., what='lodas_finalize')
      end if
      call MPI_Comm_free(ctx%inter_comm, ierr)
      ctx%connected = .false.
   end subroutine lodas_finalize

   !> The host cannot go on (its own namelist, an impossible decomposition, a failed analysis
   !> with on_failure = 'abort'). Before the handshake, the driver is told and stops with
   !> `errmsg` too and this returns (the host then finalizes MPI and stops); after it, the job
   !> is aborted with the message (MPI_Abort on the communicator given to lodas_init).
   subroutine lodas_fail(ctx, errmsg)
      type(lodas_ctx), intent(inout) :: ctx
      character(len=*), intent(in) :: errmsg
      integer :: status, ierr
      character(len=LODAS_MSG_LEN) :: msg

      msg = errmsg
      if (ctx%connected .and. .not. allocated(ctx%sbuf)) then
         status = LODAS_CONFIG_ERROR
         call handshake(ctx, 'unknown', [character(len=LODAS_NAME_LEN) ::], 0, 0, &
                        reshape([integer ::], [0, 0]), status, msg)
      else if (ctx%connected) then
         write (error_unit, '(2a)') 'lodas: host gives up: ', trim(errmsg)
         call abort_job(ctx, LODAS_CONFIG_ERROR)
      end if
   end subroutine lodas_fail

   !> Abort the whole job after the message just written to error_unit has had time to reach
   !> mpiexec's output forwarding (MPI_Abort kills every process at once; on a busy node a
   !> message still in flight is lost and the user is left with no reason).
   subroutine abort_job(ctx, code)
      type(lodas_ctx), intent(in) :: ctx
      integer, intent(in) :: code
      integer :: ierr, rc
      flush (error_unit)
      flush (output_unit)
      rc = c_usleep(500000_c_int)
      call MPI_Abort(ctx%world_comm, code, ierr)
   end subroutine abort_job

   !> Weight of the increment added after model step `k` (1-based) of the IAU window:
   !> 1/iau_steps for k <= iau_steps with increment_mode = 'iau', 0 otherwise.
   pure function lodas_iau_weight(ctx, k) result(w)
      type(lodas_ctx), intent(in) :: ctx
      integer, intent(in) :: k
      real(lodas_dp) :: w
      w = 0.0_lodas_dp
      if (trim(ctx%increment_mode) == 'iau' .and. k >= 1 .and. k <= ctx%iau_steps) &
         w = 1.0_lodas_dp/real(ctx%iau_steps, lodas_dp)
   end function lodas_iau_weight

   !> Name of a status code (the lower-case names of bridges/status.py).
   pure function lodas_status_name(status) result(name)
      integer, intent(in) :: status
      character(len=24) :: name
      select case (status)
      case (LODAS_OK); name = 'ok'
      case (LODAS_NO_OBSERVATIONS); name = 'no_observations'
      case (LODAS_BAD_BACKGROUND); name = 'bad_background'
      case (LODAS_ANALYSIS_FAILED); name = 'analysis_failed'
      case (LODAS_BAD_INCREMENT); name = 'bad_increment'
      case (LODAS_CONFIG_ERROR); name = 'config_error'
      case (LODAS_TIMEOUT); name = 'timeout'
      case (LODAS_PROTOCOL_ERROR); name = 'protocol_error'
      case default; name = 'unknown'
      end select
   end function lodas_status_name

   ! ---------------------------------------------------------------------------------------

   !> One nonblocking collective over the intercommunicator, waited for with a deadline.
   !> send: Igatherv of sbuf to the driver root; else Iscatterv from the driver root into rbuf.
   subroutine exchange(ctx, send, what)
      type(lodas_ctx), intent(inout) :: ctx
      logical, intent(in) :: send
      character(len=*), intent(in) :: what
      integer :: req, ierr, dummy_counts(1), dummy_displs(1), rc
      logical :: done
      real(lodas_dp) :: t0, waited, dummy(1)
      character(len=LODAS_MSG_LEN) :: msg

      dummy_counts = 0
      dummy_displs = 0
      if (send) then
         call MPI_Igatherv(ctx%sbuf, size(ctx%sbuf), MPI_DOUBLE_PRECISION, dummy, dummy_counts, &
                           dummy_displs, MPI_DOUBLE_PRECISION, 0, ctx%inter_comm, req, ierr)
      else
         call MPI_Iscatterv(dummy, dummy_counts, dummy_displs, MPI_DOUBLE_PRECISION, ctx%rbuf, &
                            size(ctx%rbuf), MPI_DOUBLE_PRECISION, 0, ctx%inter_comm, req, ierr)
      end if
      t0 = MPI_Wtime()
      do
         call MPI_Test(req, done, MPI_STATUS_IGNORE, ierr)
         if (done) exit
         waited = MPI_Wtime() - t0
         if (waited > ctx%deadline_s) then
            write (msg, '(3a,g0.4,a)') 'lodas: ', what, ': no answer from the driver within deadline_s = ', &
               ctx%deadline_s, ' s (&bridge_nml); aborting the job (MPI cannot cancel the exchange)'
            write (error_unit, '(a)') trim(msg)
            call abort_job(ctx, LODAS_TIMEOUT)
         end if
         ! Spin for a quick answer, then yield the core to the driver (oversubscribed nodes).
         if (waited > ctx%spin_s) rc = c_usleep(200_c_int)
      end do
   end subroutine exchange

   !> Read &bridge_nml; a missing group keeps the defaults.
   subroutine read_bridge_nml(ctx, nml_file, status, errmsg)
      type(lodas_ctx), intent(inout) :: ctx
      character(len=*), intent(in) :: nml_file
      integer, intent(out) :: status
      character(len=*), intent(out) :: errmsg
      character(len=16) :: increment_mode, on_failure
      integer :: iau_steps, unit, ios
      real(lodas_dp) :: deadline_s, spin_s
      character(len=256) :: iomsg
      namelist /bridge_nml/ increment_mode, iau_steps, deadline_s, on_failure, spin_s

      status = LODAS_OK
      errmsg = ''
      increment_mode = ctx%increment_mode
      iau_steps = ctx%iau_steps
      deadline_s = ctx%deadline_s
      on_failure = ctx%on_failure
      spin_s = ctx%spin_s
      open (newunit=unit, file=nml_file, status='old', action='read', iostat=ios, iomsg=iomsg)
      if (ios /= 0) then
         status = LODAS_CONFIG_ERROR
         errmsg = 'lodas_init: cannot open namelist file '//trim(nml_file)//': '//trim(iomsg)
         return
      end if
      read (unit, nml=bridge_nml, iostat=ios, iomsg=iomsg)
      close (unit)
      if (ios > 0) then
         status = LODAS_CONFIG_ERROR
         errmsg = 'lodas_init: '//trim(nml_file)//': &bridge_nml: '//trim(iomsg)
         return
      end if
      if (increment_mode /= 'direct' .and. increment_mode /= 'iau') then
         status = LODAS_CONFIG_ERROR
         errmsg = 'lodas_init: '//trim(nml_file)//": &bridge_nml increment_mode = '"//trim(increment_mode)// &
                  "': expected 'direct' or 'iau'"
      else if (on_failure /= 'continue' .and. on_failure /= 'abort') then
         status = LODAS_CONFIG_ERROR
         errmsg = 'lodas_init: '//trim(nml_file)//": &bridge_nml on_failure = '"//trim(on_failure)// &
                  "': expected 'continue' or 'abort'"
      else if (iau_steps < 1 .or. deadline_s <= 0 .or. spin_s < 0) then
         status = LODAS_CONFIG_ERROR
         errmsg = 'lodas_init: '//trim(nml_file)//': &bridge_nml iau_steps must be >= 1, deadline_s > 0 and spin_s >= 0'
      end if
      ctx%increment_mode = increment_mode
      ctx%iau_steps = iau_steps
      ctx%deadline_s = deadline_s
      ctx%on_failure = on_failure
      ctx%spin_s = spin_s
   end subroutine read_bridge_nml

end module lodas_bridge
